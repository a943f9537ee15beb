package dane

import (
	"testing"
	"testing/synctest"
	"time"
)

// Cached answers only from the cache, like Check's hit path, for the same
// next hop however it is spelled, and without allocating.
func TestCached(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		c := newFakeChecker(t, r, Config{})
		if _, ok, _ := c.Cached("example.com", 25, false); ok {
			t.Fatal("Cached before any Check: ok")
		}
		if n := r.count("MX example.com"); n != 0 {
			t.Fatalf("Cached looked up MX %d times, want 0", n)
		}
		wantCheck(t, c, DaneOnly)
		for _, nexthop := range []string{"example.com", "Example.COM.", "example.com."} {
			if lvl, ok, err := c.Cached(nexthop, 0, false); !ok || lvl != DaneOnly || err != nil {
				t.Errorf("Cached(%q) = %v, %v, %v; want dane-only, true, nil", nexthop, lvl, ok, err)
			}
		}
		// Another port or a bracketed host is another next hop.
		if _, ok, _ := c.Cached("example.com", 587, false); ok {
			t.Error("Cached(port 587): ok")
		}
		if _, ok, _ := c.Cached("example.com", 25, true); ok {
			t.Error("Cached(host): ok")
		}
		if allocs := testing.AllocsPerRun(100, func() { c.Check(t.Context(), "example.com", 25, false) }); allocs != 0 {
			t.Errorf("Check hit: %v allocations, want 0", allocs)
		}

		// The last quarter: Cached answers and starts the refresh.
		time.Sleep(301 * time.Second)
		if _, ok, _ := c.Cached("example.com", 25, false); !ok {
			t.Fatal("Cached in the last quarter: not ok")
		}
		synctest.Wait()
		if n := r.count("MX example.com"); n != 2 {
			t.Fatalf("MX lookups after a Cached in the last quarter = %d, want 2", n)
		}
		// Expired: nothing cached.
		time.Sleep(401 * time.Second)
		if _, ok, _ := c.Cached("example.com", 25, false); ok {
			t.Error("Cached after expiry: ok")
		}
	})
}

// A cache hit keeps its result in the LRU list: with room for two results,
// the one used since is kept and the other is evicted by a third. Recency
// is kept to the minute (cached), so the checks are a minute apart.
func TestCacheHitKeepsEntry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		for _, d := range []string{"a.example", "b.example", "c.example"} {
			r.daneDomain(d, 400*time.Second)
		}
		c := newFakeChecker(t, r, Config{Size: 2})
		for _, d := range []string{"a.example", "b.example", "a.example", "c.example"} {
			time.Sleep(61 * time.Second)
			if lvl, err := c.Check(t.Context(), d, 25, false); lvl != DaneOnly || err != nil {
				t.Fatalf("Check(%s) = %v, %v; want dane-only, nil", d, lvl, err)
			}
		}
		if _, ok, _ := c.Cached("a.example", 25, false); !ok {
			t.Error("Cached(a.example), used after b.example: evicted")
		}
		if _, ok, _ := c.Cached("b.example", 25, false); ok {
			t.Error("Cached(b.example), the least recently used: still cached")
		}
		if n := r.count("MX a.example"); n != 1 {
			t.Errorf("MX lookups of a.example = %d, want 1", n)
		}
	})
}
