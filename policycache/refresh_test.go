package policycache

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/internal/fixture"
	"stsmap/resolver"
)

func (f *fakeSource) setRecord(id string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record, f.recordErr = resolver.Record{ID: id}, err
}

func (f *fakeSource) setPolicy(p *resolver.Policy, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.policy, f.fetchErr = p, err
}

func (f *fakeSource) setHold(hold chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold = hold
}

const testInterval = time.Hour

func refreshConfig() Config {
	return Config{Refresh: RefreshConfig{Interval: testInterval, Concurrency: 4}, NegativeTTL: 15 * time.Minute}
}

// lookupMX returns the first mx of the policy served for domain, or "" for
// no policy.
func lookupMX(t *testing.T, c *Cache, domain string) string {
	t.Helper()
	e := c.Lookup(t.Context(), domain)
	if e.Policy == nil {
		return ""
	}
	return e.Policy.MX[0]
}

func policyWithMX(mx string, maxAge time.Duration) *resolver.Policy {
	return &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: maxAge, MX: []string{mx}}
}

// SPEC 6.4: an unchanged id renews the policy without any HTTPS fetch, far
// beyond its original max_age.
func TestRefreshUnchangedIDNeverFetches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx1.example", 2*time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		if got := lookupMX(t, c, "example.com"); got != "mx1.example" {
			t.Fatalf("first lookup: got %q", got)
		}
		for i := range 48 { // two days of hourly refreshes, 24 times max_age
			time.Sleep(testInterval)
			synctest.Wait()
			if got := lookupMX(t, c, "example.com"); got != "mx1.example" {
				t.Fatalf("after %d intervals: got %q, want the renewed policy", i+1, got)
			}
		}
		if got := src.fetches.Load(); got != 1 {
			t.Errorf("HTTPS fetches over 48 intervals: got %d, want 1 (the first discovery)", got)
		}
		if got := src.lookups.Load(); got < 40 || got > 49 {
			t.Errorf("TXT lookups over 48 intervals: got %d, want about one per interval", got)
		}
	})
}

// SPEC 6.4: a changed id causes exactly one fetch, and the new policy is
// served after the refresh.
func TestRefreshChangedIDFetchesOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("old.example", 24*time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		lookupMX(t, c, "example.com")
		src.setRecord("id2", nil)
		src.setPolicy(policyWithMX("new.example", 24*time.Hour), nil)
		if got := lookupMX(t, c, "example.com"); got != "old.example" {
			t.Errorf("before the refresh: got %q, want the cached old policy", got)
		}
		time.Sleep(testInterval + testInterval/10)
		synctest.Wait()
		if got := lookupMX(t, c, "example.com"); got != "new.example" {
			t.Errorf("after the refresh: got %q, want the new policy", got)
		}
		e, _ := c.Peek("example.com")
		if e.ID != "id2" {
			t.Errorf("cached id: got %q, want id2", e.ID)
		}
		for range 5 {
			time.Sleep(testInterval + testInterval/10)
			synctest.Wait()
		}
		if got := src.fetches.Load(); got != 2 {
			t.Errorf("fetches: got %d, want 2 (discovery and the one for id2)", got)
		}
	})
}

// RFC 8461 §10.2: with the TXT lookup failing, a policy near expiry is
// renewed over HTTPS; far from expiry it is only kept.
func TestRefreshTXTFailureNearExpiryRenewsOverHTTPS(t *testing.T) {
	for _, txtErr := range []error{resolver.ErrDNS, resolver.ErrNoRecord} {
		t.Run(txtErr.Error(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const maxAge = 6 * time.Hour // renew_before = 3h
				src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", maxAge)}
				c := newTestCache(t, src, refreshConfig())
				start := time.Now()
				lookupMX(t, c, "example.com")
				src.setRecord("", fmt.Errorf("x: %w", txtErr))
				src.setPolicy(policyWithMX("renewed.example", maxAge), nil)
				time.Sleep(2*testInterval + testInterval/5) // refreshed, but not yet within 3h of expiry
				synctest.Wait()
				if got := src.fetches.Load(); got != 1 {
					t.Errorf("far from expiry: got %d fetches, want 1", got)
				}
				time.Sleep(2 * testInterval) // now within renew_before
				synctest.Wait()
				if got := src.fetches.Load(); got != 2 {
					t.Errorf("near expiry: got %d fetches, want 2", got)
				}
				time.Sleep(maxAge)
				if got := lookupMX(t, c, "example.com"); got != "renewed.example" {
					t.Errorf("%v after the first max_age: got %q, want the renewed policy", time.Since(start), got)
				}
			})
		})
	}
}

// SPEC 6.4: a failed fetch keeps the old policy until it expires, then the
// domain is answered as without policy; it is retried only after the
// back-off and logged as a warning.
func TestRefreshFailedFetchKeepsPolicyUntilExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs fixture.SyncBuffer
		cfg := refreshConfig()
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
		const maxAge = 3 * time.Hour
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("old.example", maxAge)}
		c := newTestCache(t, src, cfg)
		start := time.Now()
		lookupMX(t, c, "example.com")
		src.setRecord("id2", nil)
		src.setPolicy(nil, fmt.Errorf("x: %w", resolver.ErrFetch))
		src.setRecord("id2", nil)
		for src.fetches.Load() < 2 && time.Since(start) < 2*testInterval {
			time.Sleep(time.Second)
			synctest.Wait()
		}
		fetchesAfterFirstFailure := src.fetches.Load()
		if fetchesAfterFirstFailure != 2 {
			t.Fatalf("fetches after the first refresh: got %d, want 2", fetchesAfterFirstFailure)
		}
		time.Sleep(FailureBackoff / 2)
		synctest.Wait()
		if got := src.fetches.Load(); got != 2 {
			t.Errorf("within the back-off: got %d fetches, want no retry", got)
		}
		for time.Since(start) < maxAge-time.Minute {
			if got := lookupMX(t, c, "example.com"); got != "old.example" {
				t.Fatalf("%v: got %q, want the old policy until it expires", time.Since(start), got)
			}
			time.Sleep(10 * time.Minute)
		}
		time.Sleep(2 * time.Minute)
		src.setHold(make(chan struct{})) // the discovery after expiry must not succeed either
		if got := lookupMX(t, c, "example.com"); got != "" {
			t.Errorf("after expiry: got %q, want no policy", got)
		}
		if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "new_policy_id=id2") {
			t.Errorf("no warning naming the failed id in the log:\n%s", logs.String())
		}
		retries := src.fetches.Load() - fetchesAfterFirstFailure
		if want := int32(maxAge / FailureBackoff); retries > want {
			t.Errorf("retries before expiry: got %d, want at most one per back-off (%d)", retries, want)
		}
	})
}

// SPEC 4.7: lookups that miss while a refresh of the same domain runs join
// it: 200 concurrent lookups cause no discovery of their own.
func TestLookupsDuringRefreshShareIt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const maxAge = 2 * time.Hour // renew window 1h: refreshed at ~1h, expires at 2h
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", maxAge)}
		cfg := refreshConfig()
		cfg.Refresh.Interval = 3 * time.Hour // next check: the renew time, before expiry
		cfg.FetchTimeout = 10 * time.Hour    // the held refresh outlives the policy
		c := newTestCache(t, src, cfg)
		lookupMX(t, c, "example.com")
		hold := make(chan struct{})
		src.setRecord("", resolver.ErrDNS) // refresh near expiry fetches over HTTPS...
		src.setHold(hold)                  // ...and is held there
		time.Sleep(maxAge - maxAge/2 + time.Second)
		synctest.Wait()
		lookups, fetches := src.lookups.Load(), src.fetches.Load()
		if fetches != 2 {
			t.Fatalf("the refresh did not start its fetch: %d fetches", fetches)
		}
		time.Sleep(maxAge) // the cached policy expires while the refresh is held
		var wg sync.WaitGroup
		var got atomic.Int32
		for range 200 {
			wg.Go(func() {
				if lookupMX(t, c, "example.com") == "mx.example" {
					got.Add(1)
				}
			})
		}
		synctest.Wait()
		close(hold)
		wg.Wait()
		if l, f := src.lookups.Load(), src.fetches.Load(); l != lookups || f != fetches {
			t.Errorf("200 lookups during a refresh: got %d TXT lookups and %d fetches more, want 0 and 0", l-lookups, f-fetches)
		}
		if got.Load() != 200 {
			t.Errorf("%d of 200 lookups got the refreshed policy", got.Load())
		}
	})
}

// SPEC 6.5: refreshes are bounded in concurrency and spread over time.
func TestRefreshBoundedAndSpread(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &concurrencySource{}
		cfg := refreshConfig()
		cfg.Refresh.Concurrency = 3
		c := newTestCache(t, src, cfg)
		for i := range 50 {
			c.Lookup(t.Context(), fmt.Sprintf("d%d.example", i))
		}
		src.reset()
		time.Sleep(testInterval + testInterval/10)
		synctest.Wait()
		if got := src.maxInFlight.Load(); got > 3 || got == 0 {
			t.Errorf("concurrent refreshes: got at most %d, want 1 to 3", got)
		}
		if got := src.calls.Load(); got != 50 {
			t.Errorf("refreshes in one interval: got %d, want 50", got)
		}
		if got := src.distinctTimes(); got < 40 {
			t.Errorf("refresh times: got %d distinct times for 50 domains, want them spread by jitter", got)
		}
	})
}

// concurrencySource counts TXT lookups in flight; each takes latency.
type concurrencySource struct {
	latency                               time.Duration // 0: 1s
	inFlight, maxInFlight, calls, fetches atomic.Int32
	mu                                    sync.Mutex
	times                                 map[time.Time]bool
}

func (s *concurrencySource) reset() {
	s.maxInFlight.Store(0)
	s.calls.Store(0)
	s.mu.Lock()
	s.times = map[time.Time]bool{}
	s.mu.Unlock()
}

func (s *concurrencySource) distinctTimes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.times)
}

func (s *concurrencySource) LookupRecord(ctx context.Context, domain string) (resolver.Record, error) {
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		m := s.maxInFlight.Load()
		if n <= m || s.maxInFlight.CompareAndSwap(m, n) {
			break
		}
	}
	s.calls.Add(1)
	s.mu.Lock()
	if s.times != nil {
		s.times[time.Now()] = true
	}
	s.mu.Unlock()
	time.Sleep(cmp.Or(s.latency, time.Second))
	return resolver.Record{ID: "id1"}, nil
}

func (s *concurrencySource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	s.fetches.Add(1)
	return policyWithMX("mx."+domain, 24*time.Hour), nil
}

// refresh.idle_after: a domain nobody asks for is dropped, and a looked-up
// one is kept.
func TestRefreshDropsIdleDomains(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		cfg := refreshConfig()
		cfg.Refresh.IdleAfter = 5 * time.Hour
		c := newTestCache(t, src, cfg)
		lookupMX(t, c, "idle.example")
		lookupMX(t, c, "busy.example")
		for range 8 {
			time.Sleep(testInterval)
			lookupMX(t, c, "busy.example")
		}
		synctest.Wait()
		if _, ok := c.Peek("idle.example"); ok {
			t.Errorf("idle.example still cached after 8h without a lookup (idle_after 5h)")
		}
		if _, ok := c.Peek("busy.example"); !ok {
			t.Errorf("busy.example dropped although looked up every hour")
		}
	})
}

// SPEC 6.7: a mode none policy replaces an older one and answers no policy.
func TestRefreshModeNoneReplacesPolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", 24*time.Hour)}
		c := newTestCache(t, src, refreshConfig())
		lookupMX(t, c, "example.com")
		src.setRecord("id2", nil)
		src.setPolicy(&resolver.Policy{Mode: resolver.ModeNone, MaxAge: 24 * time.Hour}, nil)
		time.Sleep(testInterval + testInterval/10)
		synctest.Wait()
		e := c.Lookup(t.Context(), "example.com")
		if e.Policy == nil || e.Policy.Mode != resolver.ModeNone || e.ID != "id2" {
			t.Errorf("after the refresh: got %+v, want the cached mode none policy id2", e)
		}
	})
}

// At scale (issue figures): 100,000 cached domains with unchanged ids cost
// one TXT query each per interval, no HTTPS fetch, and never more queries
// in flight than refresh.concurrency.
func TestRefreshAtScale(t *testing.T) {
	n := 100000
	if testing.Short() || raceEnabled {
		n = 10000
	}
	synctest.Test(t, func(t *testing.T) {
		src := &concurrencySource{latency: 20 * time.Millisecond} // a DNS round trip
		cfg := refreshConfig()
		cfg.Refresh.Concurrency = 8
		cfg.Size = n
		c := newTestCache(t, src, cfg)
		for i := range n {
			c.Lookup(t.Context(), fmt.Sprintf("d%d.example", i))
		}
		synctest.Wait()
		src.reset()
		fetchesBefore := src.fetches.Load()
		const intervals = 5
		time.Sleep(intervals * testInterval)
		synctest.Wait()
		calls := src.calls.Load()
		perDomain := float64(calls) / float64(intervals*n)
		t.Logf("%d domains, %d intervals: %d TXT queries (%.2f per domain per interval), %d fetches, at most %d in flight",
			n, intervals, calls, perDomain, src.fetches.Load()-fetchesBefore, src.maxInFlight.Load())
		if src.fetches.Load() != fetchesBefore {
			t.Errorf("HTTPS fetches with unchanged ids: got %d, want 0", src.fetches.Load()-fetchesBefore)
		}
		if got := src.maxInFlight.Load(); got > 8 {
			t.Errorf("queries in flight: got %d, want at most refresh.concurrency 8", got)
		}
		// Each domain is due every 1 to 1.1 intervals: 4 or 5 times in 5.
		if perDomain < 0.8 || perDomain > 1.0 {
			t.Errorf("TXT queries per domain per interval: got %.2f, want 0.8 to 1", perDomain)
		}
	})
}

// A policy shorter than the fetch back-off, whose TXT lookup starts to
// SERVFAIL (DNS blocked) while its policy host stays up, is renewed over
// HTTPS before it expires: a failed TXT lookup holds back no fetch (SPEC
// 4.7 is about fetches), and its retry comes no later than the renewal
// window (SPEC 6.4, RFC 8461 §10.2). Found by the soak test.
func TestRefreshTXTFailureRenewsShortPolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const maxAge = 5 * time.Minute // renew_before = 2m30s
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", maxAge)}
		cfg := refreshConfig()
		cfg.Refresh.Interval = 30 * time.Second
		c := newTestCache(t, src, cfg)
		lookupMX(t, c, "example.com")
		src.setRecord("", fmt.Errorf("x: %w", resolver.ErrDNS))
		for elapsed := time.Duration(0); elapsed < 4*maxAge; elapsed += 10 * time.Second {
			time.Sleep(10 * time.Second)
			synctest.Wait()
			if got := lookupMX(t, c, "example.com"); got != "mx.example" {
				t.Fatalf("%v after DNS was blocked: got %q, want the policy still enforced (fetches: %d)", elapsed, got, src.fetches.Load())
			}
		}
	})
}

// A policy whose max_age is shorter than the least time between two
// refreshes of a longer one (a minute) is renewed before it expires all
// the same (SPEC 6.2, 6.4): near expiry, refreshes come a quarter of its
// max_age apart.
func TestRefreshRenewsVeryShortPolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const maxAge = time.Minute // renew_before = 30s
		src := &fakeSource{record: resolver.Record{ID: "id1"}, policy: policyWithMX("mx.example", maxAge)}
		c := newTestCache(t, src, refreshConfig()) // refresh.interval 1h
		lookupMX(t, c, "example.com")
		for elapsed := time.Duration(0); elapsed < 5*maxAge; elapsed += 5 * time.Second {
			time.Sleep(5 * time.Second)
			synctest.Wait()
			if got := lookupMX(t, c, "example.com"); got != "mx.example" {
				t.Fatalf("%v after it was learned: got %q, want the policy renewed (TXT lookups: %d)", elapsed, got, src.lookups.Load())
			}
		}
		if got := src.fetches.Load(); got != 1 {
			t.Errorf("fetches: got %d, want 1 (renewals with an unchanged id fetch nothing)", got)
		}
	})
}
