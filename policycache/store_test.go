package policycache

import (
	"context"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/resolver"
)

// memStore is a Store in memory, shared by the caches of one test as a
// Redis is by a fleet. Claims are granted once per period per domain.
type memStore struct {
	mu      sync.Mutex
	entries map[string]*Entry
	claims  map[string]time.Time
	down    bool
	puts    int
}

func newMemStore() *memStore {
	return &memStore{entries: map[string]*Entry{}, claims: map[string]time.Time{}}
}

func (m *memStore) Load(ctx context.Context, now time.Time, fn func(*Entry)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		return ErrStoreUnavailable
	}
	for _, e := range m.entries {
		if now.Before(e.Expires) {
			fn(e.clone())
		}
	}
	return nil
}

func (m *memStore) Get(ctx context.Context, domain string) (*Entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		return nil, ErrStoreUnavailable
	}
	if e, ok := m.entries[domain]; ok {
		return e.clone(), nil
	}
	return nil, nil
}

func (m *memStore) Put(ctx context.Context, e *Entry) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		return ErrStoreUnavailable
	}
	m.puts++
	m.entries[e.Domain] = e.clone()
	return nil
}

func (m *memStore) Delete(ctx context.Context, domain string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.entries, domain)
	return nil
}

func (m *memStore) Claim(ctx context.Context, domain string, period time.Duration) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		return true, ErrStoreUnavailable
	}
	if until, ok := m.claims[domain]; ok && time.Now().Before(until) {
		return false, nil
	}
	m.claims[domain] = time.Now().Add(period)
	return true, nil
}

func (m *memStore) Close() error { return nil }

func (m *memStore) setDown(down bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.down = down
}

func (m *memStore) get(domain string) *Entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.entries[domain]
}

// Every learned policy is written through; a restarted cache loads it and
// answers without any I/O.
func TestStoreWriteThroughAndLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		cfg := refreshConfig()
		cfg.Store = store
		c := newTestCache(t, src, cfg)
		lookupMX(t, c, "example.com")
		if n := c.PendingWrites(); n != 1 && store.get("example.com") == nil {
			t.Errorf("right after the answer: %d writes pending and nothing stored, want the write pending or done", n)
		}
		synctest.Wait() // the write follows the answer
		if n := c.PendingWrites(); n != 0 {
			t.Errorf("pending writes once idle: got %d, want 0", n)
		}
		if e := store.get("example.com"); e == nil || e.ID != "id1" || e.Policy.MX[0] != "mx.example" {
			t.Fatalf("stored entry: got %+v, want the learned policy", e)
		}
		c.Close()

		restarted := &fakeSource{recordErr: resolver.ErrDNS, fetchErr: resolver.ErrFetch} // fixtures gone
		c2 := newTestCache(t, restarted, cfg)
		n, err := c2.LoadStore(t.Context())
		if err != nil || n != 1 {
			t.Fatalf("LoadStore: got %d, %v; want 1 entry", n, err)
		}
		if got := lookupMX(t, c2, "example.com"); got != "mx.example" {
			t.Errorf("after restart: got %q, want the stored policy", got)
		}
		if restarted.lookups.Load() != 0 || restarted.fetches.Load() != 0 {
			t.Errorf("after restart the lookup did I/O")
		}
		// Loaded entries are refreshed within the first interval, spread.
		time.Sleep(testInterval)
		synctest.Wait()
		if got := restarted.lookups.Load(); got != 1 {
			t.Errorf("TXT lookups in the first interval after restart: got %d, want 1", got)
		}
	})
}

// The daemon serves while the store loads: a lookup before the load answers
// from the store without discovery, and the load then leaves the newer
// cached entry in place.
func TestLoadStoreWhileServing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		old := policyWithMX("old.example", 24*time.Hour)
		now := time.Now()
		store.entries["stored.example"] = &Entry{Domain: "stored.example", ID: "id1", Policy: policyWithMX("stored-mx.example", 24*time.Hour),
			Reason: ReasonPolicy, Fetched: now, Expires: now.Add(24 * time.Hour)}
		store.entries["example.com"] = &Entry{Domain: "example.com", ID: "id0", Policy: old,
			Reason: ReasonPolicy, Fetched: now, Expires: now.Add(24 * time.Hour)}
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		cfg := refreshConfig()
		cfg.Store = store
		c := newTestCache(t, src, cfg)
		if got := lookupMX(t, c, "stored.example"); got != "stored-mx.example" {
			t.Errorf("before the load: got %q, want the stored policy", got)
		}
		if src.lookups.Load() != 0 {
			t.Errorf("a lookup of a stored domain before the load did a discovery")
		}
		// A newer policy than the stored one is cached before the load
		// reaches it (another MTA of the fleet stored id0 meanwhile).
		c.commit(t.Context(), &Entry{Domain: "example.com", ID: "id2", Policy: policyWithMX("mx.example", 24*time.Hour),
			Reason: ReasonPolicy, Fetched: now, Expires: now.Add(24 * time.Hour)})
		store.entries["example.com"] = &Entry{Domain: "example.com", ID: "id0", Policy: old,
			Reason: ReasonPolicy, Fetched: now, Expires: now.Add(24 * time.Hour)}
		n, err := c.LoadStore(t.Context())
		if err != nil || n != 0 {
			t.Fatalf("LoadStore: got %d, %v; want 0 entries added (both domains were cached)", n, err)
		}
		if got := lookupMX(t, c, "example.com"); got != "mx.example" {
			t.Errorf("after the load: got %q, want the newer cached policy", got)
		}
	})
}

// A fleet: what one MTA learned, another answers from the shared store, and
// each domain is refreshed once per interval across both.
func TestStoreSharedByFleet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		cfg := refreshConfig()
		cfg.Store = store
		srcA := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		srcB := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		a := newTestCache(t, srcA, cfg)
		b := newTestCache(t, srcB, cfg)
		lookupMX(t, a, "example.com")
		synctest.Wait() // a's store write follows its answer
		if got := lookupMX(t, b, "example.com"); got != "mx.example" {
			t.Fatalf("second MTA: got %q, want the policy the first learned", got)
		}
		if srcB.lookups.Load() != 0 || srcB.fetches.Load() != 0 {
			t.Errorf("second MTA did its own discovery")
		}
		for range 6 {
			time.Sleep(testInterval + testInterval/10)
			synctest.Wait()
		}
		total := srcA.lookups.Load() + srcB.lookups.Load()
		if total < 5 || total > 7 {
			t.Errorf("TXT lookups over 6 intervals across two MTAs: got %d (a %d, b %d), want one per interval", total, srcA.lookups.Load(), srcB.lookups.Load())
		}
		if f := srcA.fetches.Load() + srcB.fetches.Load(); f != 1 {
			t.Errorf("fetches: got %d, want 1", f)
		}
	})
}

// A store fault never blocks mail: lookups go on from memory and live
// discovery.
func TestStoreDownDoesNotBlock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := newMemStore()
		store.setDown(true)
		cfg := refreshConfig()
		cfg.Store = store
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		c := newTestCache(t, src, cfg)
		if _, err := c.LoadStore(t.Context()); err == nil {
			t.Errorf("LoadStore with the store down: want an error to log")
		}
		if got := lookupMX(t, c, "example.com"); got != "mx.example" {
			t.Errorf("with the store down: got %q, want live discovery", got)
		}
		for range 3 {
			time.Sleep(testInterval + testInterval/10)
			synctest.Wait()
		}
		if got := src.lookups.Load(); got < 3 {
			t.Errorf("refreshes with the store down: got %d TXT lookups, want the cache to refresh itself", got)
		}
	})
}

// A discovery's store write follows its answer; the writes of one domain
// are ordered so that the store ends with what is cached: a write whose
// entry was replaced meanwhile is skipped, and a purge is never undone by
// a write that was still pending.
func TestStoreWriteOrder(t *testing.T) {
	newPolicy := func(mx string) *Entry {
		now := time.Now()
		return &Entry{Domain: "example.com", ID: mx, Policy: policyWithMX(mx, time.Hour), Reason: ReasonPolicy,
			Fetched: now, Expires: now.Add(time.Hour)}
	}
	t.Run("replaced before its write", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			store := newMemStore()
			src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx1.example", time.Hour)}
			c := newTestCache(t, src, Config{Store: store})
			mu := c.storeLock("example.com")
			mu.Lock() // hold the discovery's write back
			if got := lookupMX(t, c, "example.com"); got != "mx1.example" {
				t.Fatalf("lookup: got %q", got)
			}
			newer := newPolicy("mx2.example")
			c.cacheEntry(newer) // a refresh replaces it in memory
			mu.Unlock()
			synctest.Wait()
			if e := store.get("example.com"); e != nil {
				t.Errorf("store after a replaced entry's write: got %q, want nothing (the replacement writes)", e.Policy.MX[0])
			}
			if err := c.persist(t.Context(), newer); err != nil {
				t.Fatal(err)
			}
			if e := store.get("example.com"); e == nil || e.Policy.MX[0] != "mx2.example" {
				t.Errorf("store after the replacement's write: got %+v, want mx2.example", e)
			}
		})
	})
	t.Run("purged while its write runs", func(t *testing.T) {
		// Real time, not a synctest bubble: a goroutine waiting on a
		// mutex is not durably blocked, so synctest.Wait would hang.
		store := &blockingPutStore{memStore: newMemStore(), release: make(chan struct{}), putting: make(chan struct{}, 1)}
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx1.example", time.Hour)}
		c := newTestCache(t, src, Config{Store: store})
		lookupMX(t, c, "example.com")
		<-store.putting // the write is inside Put, holding the domain's store lock
		purged := make(chan error)
		go func() {
			_, err := c.Purge(context.Background(), "example.com")
			purged <- err
		}()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			if _, ok := c.Peek("example.com"); !ok {
				break // Purge has removed it from memory; its store delete comes next
			}
			if time.Now().After(deadline) {
				t.Fatal("Purge did not remove the entry from memory")
			}
		}
		time.Sleep(20 * time.Millisecond) // let the delete reach the lock (it passes either way if not)
		close(store.release)
		if err := <-purged; err != nil {
			t.Fatal(err)
		}
		c.Close() // waits for the write
		if e := store.get("example.com"); e != nil {
			t.Errorf("store after a purge that raced a write: got %q, want nothing", e.Policy.MX[0])
		}
	})
}

// blockingPutStore is a memStore whose Put says so on putting, then waits
// for release.
type blockingPutStore struct {
	*memStore
	release chan struct{}
	putting chan struct{}
}

func (s *blockingPutStore) Put(ctx context.Context, e *Entry) error {
	select {
	case s.putting <- struct{}{}:
	default:
	}
	<-s.release
	return s.memStore.Put(ctx, e)
}
