package policycache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/internal/fixture"
	"stsmap/resolver"
)

// fakeSource answers from fields the test sets, counts calls, and can hold
// a fetch until the test releases it.
type fakeSource struct {
	mu        sync.Mutex
	record    resolver.Record
	recordErr error
	policy    *resolver.Policy
	fetchErr  error
	hold      chan struct{} // when non-nil, FetchPolicy waits for it to close

	lookups atomic.Int32
	fetches atomic.Int32
}

func (f *fakeSource) LookupRecord(ctx context.Context, domain string) (resolver.Record, error) {
	f.lookups.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.record, f.recordErr
}

func (f *fakeSource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	f.fetches.Add(1)
	f.mu.Lock()
	hold, p, err := f.hold, f.policy, f.fetchErr
	f.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %v", resolver.ErrFetch, ctx.Err())
		}
	}
	return p, err
}

func enforcePolicy(maxAge time.Duration) *resolver.Policy {
	return &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: maxAge, MX: []string{"mx.example.com"}}
}

func newTestCache(t *testing.T, src Source, cfg Config) *Cache {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = fixture.QuietLogger()
	}
	c := New(src, cfg)
	t.Cleanup(c.Close)
	return c
}

func TestLookupOutcomes(t *testing.T) {
	tests := []struct {
		name       string
		recordErr  error
		policy     *resolver.Policy
		fetchErr   error
		wantReason Reason
		wantID     string
		wantTTL    time.Duration
	}{
		{"policy", nil, enforcePolicy(time.Hour), nil, ReasonPolicy, "id1", time.Hour},
		{"no record", fmt.Errorf("x: %w", resolver.ErrNoRecord), nil, nil, ReasonNoRecord, "", 15 * time.Minute},
		{"invalid record", fmt.Errorf("x: %w", resolver.ErrInvalidRecord), nil, nil, ReasonInvalidRecord, "", 15 * time.Minute},
		{"dns failure", fmt.Errorf("x: %w", resolver.ErrDNS), nil, nil, ReasonDNSFailure, "", DNSFailureTTL},
		{"fetch failed", nil, nil, fmt.Errorf("x: %w", resolver.ErrFetch), ReasonFetchFailed, "id1", FailureBackoff},
		{"invalid policy", nil, nil, fmt.Errorf("x: %w", resolver.ErrInvalidPolicy), ReasonInvalidPolicy, "id1", FailureBackoff},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				src := &fakeSource{record: resolver.Record{ID: "id1"}, recordErr: tt.recordErr, policy: tt.policy, fetchErr: tt.fetchErr}
				c := newTestCache(t, src, Config{NegativeTTL: 15 * time.Minute})
				start := time.Now()
				e := c.Lookup(t.Context(), "example.com")
				if e.Reason != tt.wantReason || e.ID != tt.wantID {
					t.Fatalf("Lookup: got reason %q id %q, want %q %q", e.Reason, e.ID, tt.wantReason, tt.wantID)
				}
				if (e.Policy != nil) != (tt.wantReason == ReasonPolicy) {
					t.Errorf("Lookup: got policy %v for reason %q", e.Policy, e.Reason)
				}
				if got := e.Expires.Sub(start); got != tt.wantTTL {
					t.Errorf("entry lifetime: got %v, want %v", got, tt.wantTTL)
				}
				if tt.wantReason != ReasonPolicy && e.Err == "" {
					t.Errorf("negative entry without error text")
				}
				// Within the lifetime: answered from the cache, no I/O.
				lookups, fetches := src.lookups.Load(), src.fetches.Load()
				time.Sleep(tt.wantTTL - time.Second)
				if e2 := c.Lookup(t.Context(), "example.com"); e2 != e {
					t.Errorf("second lookup: got a different entry %+v", e2)
				}
				if src.lookups.Load() != lookups || src.fetches.Load() != fetches {
					t.Errorf("cache hit did I/O: lookups %d->%d fetches %d->%d", lookups, src.lookups.Load(), fetches, src.fetches.Load())
				}
				// After it: discovered again (SPEC 6.2, 4.7).
				time.Sleep(2 * time.Second)
				c.Lookup(t.Context(), "example.com")
				if src.lookups.Load() != lookups+1 {
					t.Errorf("after expiry: got %d record lookups, want %d", src.lookups.Load(), lookups+1)
				}
			})
		})
	}
}

func TestNegativeTTLZeroDisablesNegativeCaching(t *testing.T) {
	src := &fakeSource{recordErr: resolver.ErrNoRecord}
	c := newTestCache(t, src, Config{NegativeTTL: 0})
	for range 3 {
		if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonNoRecord {
			t.Fatalf("got reason %q, want %q", e.Reason, ReasonNoRecord)
		}
	}
	if got := src.lookups.Load(); got != 3 {
		t.Errorf("record lookups: got %d, want 3 (nothing cached)", got)
	}
	if c.Len() != 0 {
		t.Errorf("cache length: got %d, want 0", c.Len())
	}
}

func TestFirstContactDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		c := newTestCache(t, src, Config{FirstContactTimeout: 5 * time.Second, FetchTimeout: 30 * time.Second})
		start := time.Now()
		e := c.Lookup(t.Context(), "example.com")
		if e.Reason != ReasonPending || e.Policy != nil {
			t.Fatalf("slow discovery: got %+v, want a pending entry without policy", e)
		}
		if waited := time.Since(start); waited != 5*time.Second {
			t.Errorf("lookup waited %v, want the first-contact timeout 5s", waited)
		}
		// The discovery goes on in the background and fills the cache.
		close(hold)
		synctest.Wait()
		if e, ok := c.Peek("example.com"); !ok || e.Reason != ReasonPolicy {
			t.Fatalf("after the background discovery: got %+v, %v; want a cached policy", e, ok)
		}
		if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonPolicy {
			t.Errorf("next lookup: got reason %q, want a cache hit", e.Reason)
		}
		if got := src.fetches.Load(); got != 1 {
			t.Errorf("fetches: got %d, want 1", got)
		}
	})
}

func TestBackgroundDiscoveryBoundedByFetchTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: make(chan struct{})}
		c := newTestCache(t, src, Config{FirstContactTimeout: time.Second, FetchTimeout: 30 * time.Second})
		start := time.Now()
		if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonPending {
			t.Fatalf("got reason %q, want pending", e.Reason)
		}
		synctest.Wait() // the fetch is blocked until its context ends
		time.Sleep(30 * time.Second)
		synctest.Wait()
		e, ok := c.Peek("example.com")
		if !ok || e.Reason != ReasonFetchFailed {
			t.Fatalf("after the fetch timeout: got %+v %v, want a fetch_failed entry", e, ok)
		}
		if got := e.Fetched.Sub(start); got != 0 {
			t.Errorf("failure recorded at %v after start", got)
		}
		if !strings.Contains(e.Err, "deadline") {
			t.Errorf("error: got %q, want the deadline", e.Err)
		}
	})
}

func TestLookupHonoursCallerContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: make(chan struct{})}
		c := newTestCache(t, src, Config{FirstContactTimeout: 5 * time.Second})
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		start := time.Now()
		if e := c.Lookup(ctx, "example.com"); e.Reason != ReasonPending {
			t.Fatalf("got reason %q, want pending", e.Reason)
		}
		if waited := time.Since(start); waited != time.Second {
			t.Errorf("waited %v, want the caller's 1s", waited)
		}
	})
}

// SPEC 4.7: concurrent lookups of one domain share one discovery.
func TestConcurrentLookupsShareOneDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		c := newTestCache(t, src, Config{})
		var wg sync.WaitGroup
		results := make(chan *Entry, 200)
		for range 200 {
			wg.Go(func() { results <- c.Lookup(t.Context(), "example.com") })
		}
		synctest.Wait() // all 200 wait on the one held fetch
		close(hold)
		wg.Wait()
		close(results)
		for e := range results {
			if e.Reason != ReasonPolicy {
				t.Fatalf("a lookup got reason %q, want policy", e.Reason)
			}
		}
		if l, f := src.lookups.Load(), src.fetches.Load(); l != 1 || f != 1 {
			t.Errorf("200 concurrent lookups: got %d record lookups and %d fetches, want 1 and 1", l, f)
		}
	})
}

// Recency is kept to the minute: a hit moves its entry to the front of the
// LRU list once a minute at most (Lookup).
func TestLRUEvictsLeastRecentlyUsed(t *testing.T) {
	src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour)}
	now := time.Now()
	c := newTestCache(t, src, Config{Size: 2, Now: func() time.Time { return now }})
	for _, d := range []string{"a.example", "b.example", "a.example", "c.example"} {
		now = now.Add(61 * time.Second)
		c.Lookup(t.Context(), d)
	}
	if _, ok := c.Peek("b.example"); ok {
		t.Errorf("b.example still cached; want it evicted as least recently used")
	}
	for _, d := range []string{"a.example", "c.example"} {
		if _, ok := c.Peek(d); !ok {
			t.Errorf("%s evicted; want it cached", d)
		}
	}
}

func TestCloseWaitsForBackgroundDiscovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: make(chan struct{})}
		c := New(src, Config{FirstContactTimeout: time.Second, Logger: fixture.QuietLogger()})
		c.Lookup(t.Context(), "example.com")
		c.Close() // cancels the held fetch and waits for it
		if e := c.Lookup(t.Context(), "other.example"); e.Reason != ReasonPending {
			t.Errorf("lookup after Close: got reason %q, want pending", e.Reason)
		}
		if got := src.lookups.Load(); got != 1 {
			t.Errorf("record lookups after Close: got %d, want 1", got)
		}
	})
}

func TestMaxAgeZeroServesOnceWithoutCaching(t *testing.T) {
	src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(0)}
	c := newTestCache(t, src, Config{})
	if e := c.Lookup(t.Context(), "example.com"); e.Reason != ReasonPolicy {
		t.Fatalf("got reason %q, want policy", e.Reason)
	}
	if c.Len() != 0 {
		t.Errorf("a max_age 0 policy was cached")
	}
}

func TestBoundedErrorText(t *testing.T) {
	long := errors.New(strings.Repeat("x", 10000))
	if got := bounded(long); len(got) > maxErrLen+3 {
		t.Errorf("bounded: got %d bytes, want at most %d", len(got), maxErrLen+3)
	}
	mx := make([]string, 1000)
	for i := range mx {
		mx[i] = fmt.Sprintf("mx%d.example.com", i)
	}
	if got := mxSummary(mx); len(got) > 300 || !strings.Contains(got, "more)") {
		t.Errorf("mxSummary: got %d bytes %q", len(got), got[:min(len(got), 80)])
	}
}

func BenchmarkLookupHit(b *testing.B) {
	src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour)}
	c := New(src, Config{Logger: fixture.QuietLogger()})
	defer c.Close()
	ctx := context.Background()
	c.Lookup(ctx, "example.com")
	b.ReportAllocs()
	for b.Loop() {
		if e := c.Lookup(ctx, "example.com"); e.Policy == nil {
			b.Fatal("miss")
		}
	}
}

// Begin starts a discovery without waiting and counts one miss; finishing
// it waits for that discovery, and a Lookup meanwhile joins it (SPEC 4.7);
// a cached domain is a hit with no discovery (SPEC 6.1).
func TestBegin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: enforcePolicy(time.Hour), hold: hold}
		obs := newRecordingObserver()
		c := newTestCache(t, src, Config{Observer: obs})
		finish := c.Begin("example.com")
		synctest.Wait()
		if got := src.fetches.Load(); got != 1 {
			t.Fatalf("fetches after Begin: got %d, want 1 (started, held)", got)
		}
		joined := make(chan *Entry)
		go func() { joined <- c.Lookup(context.Background(), "example.com") }()
		synctest.Wait()
		close(hold)
		if e := finish(context.Background()); e.Policy == nil {
			t.Errorf("finished lookup: got %+v, want the policy", e)
		}
		if e := <-joined; e.Policy == nil {
			t.Errorf("joined Lookup: got %+v, want the policy", e)
		}
		if e := c.Begin("example.com")(context.Background()); e.Policy == nil {
			t.Errorf("Begin of a cached domain: got %+v, want the policy", e)
		}
		if got, want := [2]int32{src.lookups.Load(), src.fetches.Load()}, [2]int32{1, 1}; got != want {
			t.Errorf("TXT lookups and fetches: got %v, want %v (one discovery, joined, then cached)", got, want)
		}
		if got, want := [2]int{obs.get("miss"), obs.get("hit")}, [2]int{2, 1}; got != want {
			t.Errorf("misses and hits: got %v, want %v", got, want)
		}
	})
}
