package policycache

import (
	"context"
	"errors"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/internal/fixture"
	"stsmap/resolver"
)

func TestListSortedSnapshot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour)}
		c := newTestCache(t, src, Config{NegativeTTL: 15 * time.Minute})
		for _, d := range []string{"c.example", "a.example", "b.example"} {
			c.Lookup(t.Context(), d)
		}
		src.setRecord("", resolver.ErrNoRecord)
		c.Lookup(t.Context(), "0.example")

		list := c.List()
		var got []string
		for _, e := range list {
			got = append(got, e.Domain)
		}
		if want := []string{"0.example", "a.example", "b.example", "c.example"}; !slices.Equal(got, want) {
			t.Fatalf("List: got %v, want %v", got, want)
		}
		if list[0].Reason != ReasonNoRecord || list[1].Policy == nil {
			t.Errorf("List: got reasons %q, %q; want the negative entry and the policies", list[0].Reason, list[1].Reason)
		}
		// List does not touch recency: c.example stays the oldest.
		c2 := newTestCache(t, src, Config{Size: 2})
		src.setRecord("id1", nil)
		c2.Lookup(t.Context(), "a.example")
		c2.Lookup(t.Context(), "b.example")
		c2.List()
		c2.Lookup(t.Context(), "c.example")
		if _, ok := c2.Peek("a.example"); ok {
			t.Errorf("after List, a.example was kept; want it evicted as least recently used")
		}
	})
}

// Purge is the remedy for a policy changed without a new id: the refresher
// would keep renewing the old one, the next lookup after a purge fetches
// the new one.
func TestPurgeThenFreshDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("old.example", 24*time.Hour)}
		cfg := refreshConfig()
		cfg.Store = store
		c := newTestCache(t, src, cfg)
		lookupMX(t, c, "example.com")
		src.setPolicy(policyWithMX("new.example", 24*time.Hour), nil) // same id

		cached, err := c.Purge(t.Context(), "example.com")
		if !cached || err != nil {
			t.Fatalf("Purge: got %v, %v; want true, nil", cached, err)
		}
		if _, ok := c.Peek("example.com"); ok {
			t.Errorf("after Purge: still cached in memory")
		}
		if store.get("example.com") != nil {
			t.Errorf("after Purge: still in the store")
		}
		lookups, fetches := src.lookups.Load(), src.fetches.Load()
		if got := lookupMX(t, c, "example.com"); got != "new.example" {
			t.Errorf("lookup after Purge: got mx %q, want the new policy", got)
		}
		if src.lookups.Load() != lookups+1 || src.fetches.Load() != fetches+1 {
			t.Errorf("lookup after Purge: got %d TXT lookups and %d fetches, want one of each",
				src.lookups.Load()-lookups, src.fetches.Load()-fetches)
		}
		if cached, err := c.Purge(t.Context(), "other.example"); cached || err != nil {
			t.Errorf("Purge of an uncached domain: got %v, %v; want false, nil", cached, err)
		}
	})
}

// deleteFailingStore is a memStore whose deletes fail.
type deleteFailingStore struct{ *memStore }

func (deleteFailingStore) Delete(ctx context.Context, domain string) error {
	return ErrStoreUnavailable
}

func TestPurgeReportsStoreFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour)}
		c := newTestCache(t, src, Config{Store: deleteFailingStore{newMemStore()}})
		c.Lookup(t.Context(), "example.com")
		synctest.Wait() // the policy is written to the store after the answer
		cached, err := c.Purge(t.Context(), "example.com")
		if !cached || !errors.Is(err, ErrStoreUnavailable) {
			t.Errorf("Purge with a failing store: got %v, %v; want true and the store error", cached, err)
		}
		if _, ok := c.Peek("example.com"); ok {
			t.Errorf("Purge with a failing store: still cached in memory")
		}
		if _, err := c.PurgeAll(t.Context()); !errors.Is(err, ErrStoreUnavailable) {
			t.Errorf("PurgeAll with a failing store: got %v, want the store error", err)
		}
	})
}

// A discovery that is running when Purge is called cannot put back what it
// learned after the purge.
func TestPurgeWaitsForRunningDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		c := newTestCache(t, src, Config{FirstContactTimeout: time.Second})
		if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonPending {
			t.Fatalf("held discovery: got reason %q, want pending", e.Reason)
		}
		done := make(chan bool)
		go func() {
			cached, _ := c.Purge(t.Context(), "example.com")
			done <- cached
		}()
		synctest.Wait() // Purge waits on the held discovery
		close(hold)
		if cached := <-done; !cached {
			t.Errorf("Purge: got false, want true (the discovery cached the domain first)")
		}
		if e, ok := c.Peek("example.com"); ok {
			t.Errorf("after Purge: the discovery's entry %+v is cached", e)
		}
	})
}

func TestPurgeAll(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour)}
		c := newTestCache(t, src, Config{Store: store, NegativeTTL: 15 * time.Minute})
		c.Lookup(t.Context(), "a.example")
		c.Lookup(t.Context(), "b.example")
		src.setRecord("", resolver.ErrNoRecord)
		c.Lookup(t.Context(), "negative.example")
		// Learned by another MTA of a fleet: in the store only.
		other := &Entry{Domain: "fleet.example", ID: "9", Policy: enforcePolicy(time.Hour), Reason: ReasonPolicy,
			Fetched: time.Now(), Expires: time.Now().Add(time.Hour)}
		store.Put(t.Context(), other)

		n, err := c.PurgeAll(t.Context())
		if n != 4 || err != nil {
			t.Errorf("PurgeAll: got %d, %v; want 4 domains, nil", n, err)
		}
		if c.Len() != 0 {
			t.Errorf("after PurgeAll: %d entries in memory, want 0", c.Len())
		}
		for _, d := range []string{"a.example", "b.example", "fleet.example"} {
			if store.get(d) != nil {
				t.Errorf("after PurgeAll: %s still in the store", d)
			}
		}
		if n, err := c.PurgeAll(t.Context()); n != 0 || err != nil {
			t.Errorf("PurgeAll of an empty cache: got %d, %v; want 0, nil", n, err)
		}
	})
}

// A new id is served at once after RefreshNow, without waiting for the
// refresh interval.
func TestRefreshNowChangedID(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("old.example", 24*time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		lookupMX(t, c, "example.com")
		src.setRecord("id2", nil)
		src.setPolicy(policyWithMX("new.example", 24*time.Hour), nil)

		e, err := c.RefreshNow(t.Context(), "example.com")
		if err != nil || e.ID != "id2" || e.Policy.MX[0] != "new.example" {
			t.Fatalf("RefreshNow: got %+v, %v; want id2 with the new policy", e, err)
		}
		fetches := src.fetches.Load()
		if got := lookupMX(t, c, "example.com"); got != "new.example" || src.fetches.Load() != fetches {
			t.Errorf("lookup after RefreshNow: got mx %q with %d fetches, want the new policy from the cache",
				got, src.fetches.Load()-fetches)
		}
	})
}

func TestRefreshNowUnchangedIDRenewsWithoutFetch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(24 * time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		first := c.Lookup(t.Context(), "example.com")
		time.Sleep(10 * time.Minute)
		e, err := c.RefreshNow(t.Context(), "example.com")
		if err != nil || e.ID != "id1" || !e.Checked.Equal(time.Now()) || !e.Expires.Equal(time.Now().Add(24*time.Hour)) {
			t.Fatalf("RefreshNow: got %+v, %v; want id1 checked and renewed now", e, err)
		}
		if e.Fetched != first.Fetched || src.fetches.Load() != 1 {
			t.Errorf("RefreshNow of an unchanged id fetched the policy (%d fetches)", src.fetches.Load())
		}
	})
}

// An operator retrying after fixing the policy host is not held back by
// the failure back-off.
func TestRefreshNowIgnoresBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("old.example", 24*time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		lookupMX(t, c, "example.com")
		src.setRecord("id2", nil)
		src.setPolicy(nil, resolver.ErrFetch)
		e, err := c.RefreshNow(t.Context(), "example.com")
		if err != nil || e.ID != "id1" || e.FailedID != "id2" {
			t.Fatalf("failing RefreshNow: got %+v, %v; want id1 kept and id2 failed", e, err)
		}
		src.setPolicy(policyWithMX("new.example", 24*time.Hour), nil)
		e, err = c.RefreshNow(t.Context(), "example.com")
		if err != nil || e.ID != "id2" || e.FailedID != "" {
			t.Errorf("RefreshNow within the back-off: got %+v, %v; want id2 fetched", e, err)
		}
	})
}

func TestRefreshNowDiscovers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{recordErr: resolver.ErrNoRecord}
		c := newTestCache(t, src, Config{NegativeTTL: 15 * time.Minute, FirstContactTimeout: time.Second, FetchTimeout: 30 * time.Second})
		if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonNoRecord {
			t.Fatalf("Lookup: got reason %q, want no_record", e.Reason)
		}
		// The domain publishes a policy, within the negative TTL; its host
		// is slower than the first-contact timeout: RefreshNow waits.
		src.setRecord("id1", nil)
		src.setPolicy(enforcePolicy(time.Hour), nil)
		hold := make(chan struct{})
		src.setHold(hold)
		go func() {
			time.Sleep(5 * time.Second)
			close(hold)
		}()
		e, err := c.RefreshNow(t.Context(), "example.com")
		if err != nil || e.Reason != ReasonPolicy || e.ID != "id1" {
			t.Fatalf("RefreshNow of a negative entry: got %+v, %v; want the discovered policy", e, err)
		}
		if got, ok := c.Peek("example.com"); !ok || got != e {
			t.Errorf("after RefreshNow: cached %+v, want the discovered entry", got)
		}
		e, err = c.RefreshNow(t.Context(), "new.example")
		if err != nil || e.Reason != ReasonPolicy {
			t.Errorf("RefreshNow of an uncached domain: got %+v, %v; want a discovery", e, err)
		}
	})
}

// RefreshNow checks after it is called: a discovery already running, which
// looked the record up before, is waited for, then the domain re-checked.
func TestRefreshNowAfterRunningDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		c := newTestCache(t, src, Config{FirstContactTimeout: time.Second})
		c.Lookup(t.Context(), "example.com") // its fetch is held
		done := make(chan *Entry)
		go func() {
			e, _ := c.RefreshNow(t.Context(), "example.com")
			done <- e
		}()
		synctest.Wait()
		src.setRecord("id2", nil)
		close(hold)
		if e := <-done; e == nil || e.ID != "id2" {
			t.Errorf("RefreshNow: got %+v, want id2, published after the call", e)
		}
	})
}

// RefreshNow's work is the cache's: an operator giving up does not leave a
// failed fetch cached for lookups to answer from.
func TestRefreshNowCallerGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		c := newTestCache(t, src, Config{})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			defer close(done)
			c.RefreshNow(ctx, "example.com")
		}()
		synctest.Wait()
		cancel()
		close(hold)
		<-done
		if e, ok := c.Peek("example.com"); !ok || e.Reason != ReasonPolicy {
			t.Errorf("after the caller gave up: got %+v, want the policy cached", e)
		}
	})
}

func TestAdminAfterClose(t *testing.T) {
	c := New(&fakeSource{}, Config{Logger: fixture.QuietLogger()})
	c.Close()
	if _, err := c.Purge(t.Context(), "example.com"); !errors.Is(err, ErrClosed) {
		t.Errorf("Purge after Close: got %v, want ErrClosed", err)
	}
	if _, err := c.PurgeAll(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("PurgeAll after Close: got %v, want ErrClosed", err)
	}
	if _, err := c.RefreshNow(t.Context(), "example.com"); !errors.Is(err, ErrClosed) {
		t.Errorf("RefreshNow after Close: got %v, want ErrClosed", err)
	}
}
