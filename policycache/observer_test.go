package policycache

import (
	"fmt"
	"maps"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/resolver"
)

// recordingObserver counts what it is told, by "hit", "miss",
// "discovery:OUTCOME", "refresh:OUTCOME" and "store:OP".
type recordingObserver struct {
	mu     sync.Mutex
	counts map[string]int
}

func newRecordingObserver() *recordingObserver {
	return &recordingObserver{counts: map[string]int{}}
}

func (r *recordingObserver) add(key string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[key]++
}

func (r *recordingObserver) CacheHit()                { r.add("hit") }
func (r *recordingObserver) CacheMiss()               { r.add("miss") }
func (r *recordingObserver) Discovery(outcome string) { r.add("discovery:" + outcome) }
func (r *recordingObserver) Refresh(outcome string)   { r.add("refresh:" + outcome) }
func (r *recordingObserver) StoreError(op string)     { r.add("store:" + op) }

func (r *recordingObserver) get(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[key]
}

func (r *recordingObserver) snapshot() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.counts)
}

var _ Observer = (*recordingObserver)(nil)

// Each discovery is reported once with its outcome; a lookup is a miss
// until the entry is cached, a hit after.
func TestObserverDiscoveryOutcomes(t *testing.T) {
	tests := []struct {
		name      string
		recordErr error
		fetchErr  error
		want      string
	}{
		{"policy", nil, nil, "policy"},
		{"no record", fmt.Errorf("x: %w", resolver.ErrNoRecord), nil, "no_record"},
		{"invalid record", fmt.Errorf("x: %w", resolver.ErrInvalidRecord), nil, "invalid_record"},
		{"dns failure", fmt.Errorf("x: %w", resolver.ErrDNS), nil, "dns_failure"},
		// A fetch error without a class of resolver's: "other".
		{"fetch error", nil, fmt.Errorf("x: %w", resolver.ErrFetch), "fetch_error_other"},
		{"invalid policy", nil, fmt.Errorf("x: %w", resolver.ErrInvalidPolicy), "invalid_policy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				src := &fakeSource{record: resolver.Record{ID: "id1"}, recordErr: tt.recordErr, policy: enforcePolicy(time.Hour), fetchErr: tt.fetchErr}
				obs := newRecordingObserver()
				c := newTestCache(t, src, Config{NegativeTTL: 15 * time.Minute, Observer: obs})
				c.Lookup(t.Context(), "example.com")
				c.Lookup(t.Context(), "example.com")
				want := map[string]int{"miss": 1, "hit": 1, "discovery:" + tt.want: 1}
				if got := obs.snapshot(); !maps.Equal(got, want) {
					t.Errorf("observed: got %v, want %v", got, want)
				}
			})
		})
	}
}

// Stats counts unexpired policies by mode and unexpired negative entries;
// expired entries only in Entries.
func TestStats(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}}
		c := newTestCache(t, src, Config{NegativeTTL: 15 * time.Minute})
		for _, mode := range []resolver.Mode{resolver.ModeEnforce, resolver.ModeTesting, resolver.ModeNone} {
			src.setPolicy(&resolver.Policy{Mode: mode, MaxAge: time.Hour, MX: []string{"mx.example"}}, nil)
			c.Lookup(t.Context(), string(mode)+".example")
		}
		src.setRecord("", fmt.Errorf("x: %w", resolver.ErrNoRecord))
		c.Lookup(t.Context(), "norecord.example")

		check := func(when string, want Stats) {
			t.Helper()
			got := c.Stats()
			if got.Entries != want.Entries || !maps.Equal(got.ByMode, want.ByMode) || got.Negative != want.Negative ||
				got.RefreshFailingOverADay != want.RefreshFailingOverADay {
				t.Errorf("%s: got %+v, want %+v", when, got, want)
			}
		}
		check("at once", Stats{Entries: 4, ByMode: map[string]int{"enforce": 1, "testing": 1, "none": 1}, Negative: 1})
		time.Sleep(15 * time.Minute)
		check("after the negative TTL", Stats{Entries: 4, ByMode: map[string]int{"enforce": 1, "testing": 1, "none": 1}})
		time.Sleep(45 * time.Minute)
		check("after max_age", Stats{Entries: 4, ByMode: map[string]int{}})
	})
}

// Each refresh is reported with its outcome (SPEC 6.4).
func TestObserverRefreshOutcomes(t *testing.T) {
	tests := []struct {
		name   string
		maxAge time.Duration
		// change is applied to the source after the first lookup.
		change func(*fakeSource)
		// wait is how long the refresher then runs.
		wait time.Duration
		want map[string]int // at least these counts
	}{
		{"unchanged id", 24 * time.Hour, func(*fakeSource) {}, 2*testInterval + testInterval/5,
			map[string]int{"refresh:renewed": 2}},
		{"new id", 24 * time.Hour, func(s *fakeSource) { s.setRecord("id2", nil) }, testInterval + testInterval/10,
			map[string]int{"refresh:id_changed": 1}},
		{"new id, fetch fails", 24 * time.Hour, func(s *fakeSource) {
			s.setRecord("id2", nil)
			s.setPolicy(nil, fmt.Errorf("x: %w", resolver.ErrFetch))
		}, testInterval + testInterval/10, map[string]int{"refresh:failed": 1}},
		{"record gone, then renewed over HTTPS", 6 * time.Hour, func(s *fakeSource) {
			s.setRecord("", fmt.Errorf("x: %w", resolver.ErrNoRecord))
		}, 4 * testInterval, map[string]int{"refresh:kept": 1, "refresh:renewed_https": 1}},
		{"DNS and HTTPS fail until expiry", 3 * time.Hour, func(s *fakeSource) {
			s.setRecord("", fmt.Errorf("x: %w", resolver.ErrDNS))
			s.setPolicy(nil, fmt.Errorf("x: %w", resolver.ErrFetch))
		}, 4 * testInterval, map[string]int{"refresh:failed": 2, "refresh:dropped_expired": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", tt.maxAge)}
				obs := newRecordingObserver()
				cfg := refreshConfig()
				cfg.Observer = obs
				c := newTestCache(t, src, cfg)
				c.Lookup(t.Context(), "example.com")
				tt.change(src)
				time.Sleep(tt.wait)
				synctest.Wait()
				got := obs.snapshot()
				for k, n := range tt.want {
					if got[k] < n {
						t.Errorf("%s: got %d, want at least %d (all: %v)", k, got[k], n, got)
					}
				}
			})
		})
	}
}

func TestObserverRefreshDropsIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		obs := newRecordingObserver()
		cfg := refreshConfig()
		cfg.Observer = obs
		cfg.Refresh.IdleAfter = 5 * time.Hour
		c := newTestCache(t, src, cfg)
		c.Lookup(t.Context(), "example.com")
		time.Sleep(8 * testInterval)
		synctest.Wait()
		if got := obs.get("refresh:dropped_idle"); got != 1 {
			t.Errorf("dropped_idle: got %d, want 1 (all: %v)", got, obs.snapshot())
		}
	})
}

// RFC 8461 §10.2: FailingSince marks the first of a run of failed
// refreshes, survives the retries, and is cleared by a success; Stats counts
// a policy failing for over a day.
func TestRefreshFailingSince(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 7*24*time.Hour)}
		obs := newRecordingObserver()
		cfg := refreshConfig()
		cfg.Observer = obs
		c := newTestCache(t, src, cfg)
		start := time.Now()
		c.Lookup(t.Context(), "example.com")
		src.setRecord("", fmt.Errorf("SERVFAIL: %w", resolver.ErrDNS))

		time.Sleep(2 * testInterval)
		synctest.Wait()
		e, _ := c.Peek("example.com")
		first := e.FailingSince
		if first.Before(start.Add(testInterval)) || first.After(start.Add(testInterval+testInterval/10)) {
			t.Fatalf("FailingSince: got %v after start, want the first refresh, about one interval in", first.Sub(start))
		}
		if !e.FailedAt.After(first) {
			t.Errorf("FailedAt %v is not after FailingSince %v: want retries after the first failure", e.FailedAt.Sub(start), first.Sub(start))
		}
		if n := obs.get("refresh:failed"); n < 2 {
			t.Errorf("refresh:failed: got %d, want a failure per retry", n)
		}

		time.Sleep(time.Until(first.Add(FailingRefreshAlarm)) - time.Minute)
		synctest.Wait()
		if got := c.Stats().RefreshFailingOverADay; got != 0 {
			t.Errorf("just under a day of failures: got %d failing over a day, want 0", got)
		}
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		if got := c.Stats().RefreshFailingOverADay; got != 1 {
			t.Errorf("over a day of failures: got %d failing over a day, want 1", got)
		}
		if e, _ := c.Peek("example.com"); !e.FailingSince.Equal(first) {
			t.Errorf("FailingSince moved from %v to %v over the retries", first.Sub(start), e.FailingSince.Sub(start))
		}

		src.setRecord("id1", nil)
		time.Sleep(FailureBackoff + FailureBackoff/10)
		synctest.Wait()
		e, _ = c.Peek("example.com")
		if !e.FailingSince.IsZero() || !e.FailedAt.IsZero() {
			t.Errorf("after a renewal: FailingSince %v FailedAt %v, want both zero", e.FailingSince, e.FailedAt)
		}
		if got := c.Stats().RefreshFailingOverADay; got != 0 {
			t.Errorf("after a renewal: got %d failing over a day, want 0", got)
		}
		if obs.get("refresh:renewed") != 1 {
			t.Errorf("refresh:renewed: got %d, want 1", obs.get("refresh:renewed"))
		}
	})
}

// A record stored before FailingSince existed counts its failures from its
// last known one.
func TestRefreshFailingSinceFromLegacyRecord(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		now := time.Now()
		legacy := &Entry{Domain: "example.com", ID: "id1", Reason: ReasonPolicy, Policy: policyWithMX("mx.example", 7*24*time.Hour),
			Fetched: now.Add(-48 * time.Hour), Expires: now.Add(5 * 24 * time.Hour), FailedAt: now.Add(-30 * time.Hour)}
		legacy.LastUsed.Store(now.Unix())
		store.Put(t.Context(), legacy)
		src := &fakeSource{recordErr: fmt.Errorf("x: %w", resolver.ErrDNS)}
		cfg := refreshConfig()
		cfg.Store = store
		c := newTestCache(t, src, cfg)
		if _, err := c.LoadStore(t.Context()); err != nil {
			t.Fatal(err)
		}
		if got := c.Stats().RefreshFailingOverADay; got != 0 {
			t.Errorf("before a refresh: got %d failing over a day, want 0 (FailingSince unknown)", got)
		}
		time.Sleep(testInterval)
		synctest.Wait()
		e, _ := c.Peek("example.com")
		if !e.FailingSince.Equal(legacy.FailedAt) {
			t.Errorf("FailingSince: got %v, want the stored FailedAt %v", e.FailingSince, legacy.FailedAt)
		}
		if got := c.Stats().RefreshFailingOverADay; got != 1 {
			t.Errorf("after a failed refresh: got %d failing over a day, want 1", got)
		}
		if s := store.get("example.com"); s == nil || !s.FailingSince.Equal(legacy.FailedAt) {
			t.Errorf("stored entry: got %+v, want FailingSince written through", s)
		}
	})
}

// Store failures are reported by operation; a fleet's refreshes are
// adopted from the store.
func TestObserverStore(t *testing.T) {
	t.Run("down", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			store := newMemStore()
			store.setDown(true)
			obs := newRecordingObserver()
			cfg := refreshConfig()
			cfg.Store, cfg.Observer = store, obs
			src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
			c := newTestCache(t, src, cfg)
			if _, err := c.LoadStore(t.Context()); err == nil {
				t.Fatal("LoadStore: got no error from a store that is down")
			}
			c.Lookup(t.Context(), "example.com")
			time.Sleep(testInterval + testInterval/10)
			synctest.Wait()
			got := obs.snapshot()
			for _, k := range []string{"store:load", "store:get", "store:put", "store:claim"} {
				if got[k] < 1 {
					t.Errorf("%s: got %d, want at least 1 (all: %v)", k, got[k], got)
				}
			}
		})
	})
	t.Run("fleet", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			store := newMemStore()
			obsA, obsB := newRecordingObserver(), newRecordingObserver()
			src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
			cfgA, cfgB := refreshConfig(), refreshConfig()
			cfgA.Store, cfgA.Observer = store, obsA
			cfgB.Store, cfgB.Observer = store, obsB
			a, b := newTestCache(t, src, cfgA), newTestCache(t, src, cfgB)
			a.Lookup(t.Context(), "example.com")
			b.Lookup(t.Context(), "example.com")
			for range 4 {
				time.Sleep(testInterval + testInterval/10)
				synctest.Wait()
			}
			renewed := obsA.get("refresh:renewed") + obsB.get("refresh:renewed")
			adopted := obsA.get("refresh:adopted") + obsB.get("refresh:adopted")
			if renewed < 3 || adopted < 3 {
				t.Errorf("over 4 intervals: got %d renewed and %d adopted, want about 4 of each (a %v, b %v)",
					renewed, adopted, obsA.snapshot(), obsB.snapshot())
			}
		})
	})
}
