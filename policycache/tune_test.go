package policycache

import (
	"testing"
	"testing/synctest"
	"time"

	"stsmap/resolver"
)

// A reload's new first-contact timeout and negative TTL apply to the next
// lookups.
func TestRetune(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: make(chan struct{})}
		c := newTestCache(t, src, Config{FirstContactTimeout: 5 * time.Second, NegativeTTL: time.Hour})
		c.Retune(Tunables{FirstContactTimeout: time.Second, NegativeTTL: time.Minute})
		start := time.Now()
		c.Lookup(t.Context(), "slow.example")
		if waited := time.Since(start); waited != time.Second {
			t.Errorf("lookup waited %v, want the retuned 1s", waited)
		}
		src.setRecord("", resolver.ErrNoRecord)
		e := c.Lookup(t.Context(), "none.example")
		if got := e.Expires.Sub(e.Fetched); got != time.Minute {
			t.Errorf("negative entry lifetime: got %v, want the retuned 1m", got)
		}
		if got := c.t().FetchTimeout; got != 30*time.Second {
			t.Errorf("unset FetchTimeout: got %v, want the old 30s kept", got)
		}
	})
}
