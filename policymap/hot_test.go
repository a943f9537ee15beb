package policymap

import (
	"cmp"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
	"unsafe"

	"stsmap/dane"
	"stsmap/internal/fixture"
	"stsmap/internal/stamp"
	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// hotSource is a policycache.Source whose record id, policy and failures
// a test changes as it goes. Its zero value has no record.
type hotSource struct {
	mu      sync.Mutex
	id      string // "" for no record
	mx      string // patterns separated by spaces
	maxAge  time.Duration
	lookups int // TXT lookups made
}

func (s *hotSource) set(id, mx string, maxAge time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.id, s.mx, s.maxAge = id, mx, maxAge
}

func (s *hotSource) LookupRecord(ctx context.Context, domain string) (resolver.Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lookups++
	if s.id == "" {
		return resolver.Record{}, resolver.ErrNoRecord
	}
	return resolver.Record{ID: s.id}, nil
}

func (s *hotSource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: s.maxAge, MX: strings.Fields(s.mx)}, nil
}

func (s *hotSource) txtLookups() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookups
}

// hotDNS is a dane.Resolver whose answer a test switches between no DANE
// (unauthenticated MX) and DANE-only (authenticated MX with usable TLSA).
// Each MX lookup takes delay and gives ttl (0: an hour).
type hotDNS struct {
	secure atomic.Bool
	delay  time.Duration
	ttl    time.Duration
}

func (d *hotDNS) LookupMX(ctx context.Context, domain string) ([]string, resolver.Answer, error) {
	time.Sleep(d.delay)
	return []string{"mx.example.com"}, resolver.Answer{Authentic: d.secure.Load(), TTL: cmp.Or(d.ttl, time.Hour)}, nil
}

func (d *hotDNS) LookupTLSA(ctx context.Context, name string) ([]resolver.TLSA, resolver.Answer, error) {
	if !d.secure.Load() {
		return nil, resolver.Answer{}, resolver.ErrNoRecord
	}
	return []resolver.TLSA{{Usage: 3, Selector: 1, MatchingType: 1, Data: make([]byte, 32)}},
		resolver.Answer{Authentic: true, TTL: time.Hour}, nil
}

// countingObserver counts cache hits and misses.
type countingObserver struct{ hits, misses atomic.Int64 }

func (o *countingObserver) CacheHit()         { o.hits.Add(1) }
func (o *countingObserver) CacheMiss()        { o.misses.Add(1) }
func (o *countingObserver) Discovery(string)  {}
func (o *countingObserver) Refresh(string)    {}
func (o *countingObserver) StoreError(string) {}

// hotStack is a Handler over a real policy cache and DANE checker, in a
// synctest bubble (fake time).
type hotStack struct {
	src      *hotSource
	dns      *hotDNS
	obs      *countingObserver
	cache    *policycache.Cache
	h        *Handler
	settings atomic.Pointer[Settings]
}

func newHotStack(t *testing.T, withDANE bool) *hotStack {
	t.Helper()
	s := &hotStack{src: &hotSource{}, dns: &hotDNS{}, obs: &countingObserver{}}
	s.src.set("id1", "mx1.example.com", time.Hour)
	s.cache = policycache.New(s.src, policycache.Config{Logger: fixture.QuietLogger(), Observer: s.obs})
	t.Cleanup(s.cache.Close)
	s.settings.Store(&Settings{})
	s.h = &Handler{Cache: s.cache, Settings: func(string) Settings { return *s.settings.Load() }}
	if withDANE {
		d := dane.New(s.dns, dane.Config{Logger: fixture.QuietLogger()})
		t.Cleanup(d.Close)
		s.h.DANE = d
	}
	return s
}

// ask looks key up twice, the second time from the hot table when the
// first reply was kept, and wants both replies to be want.
func (s *hotStack) ask(t *testing.T, key string, want socketmap.Reply) {
	t.Helper()
	for i := range 2 {
		if got := s.h.ServeSocketmap(t.Context(), "postfix", key); got != want {
			t.Fatalf("lookup %d of %s: got %+v, want %+v", i+1, key, got, want)
		}
		synctest.Wait() // background work a lookup started ends
	}
}

func (s *hotStack) kept(key string) bool {
	s.h.hot.mu.RLock()
	defer s.h.hot.mu.RUnlock()
	_, ok := s.h.hot.m[key]
	return ok
}

// The hot table is in use with the real caches, and a reply kept in it
// follows every change of what it was worked out from.
func TestHotReplyFollowsChanges(t *testing.T) {
	mx1, mx2 := socketmap.OK("secure match=mx1.example.com"), socketmap.OK("secure match=mx2.example.com")
	t.Run("kept", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, true)
			s.ask(t, "example.com", mx1) // first contact: waits, not kept
			s.ask(t, "example.com", mx1)
			if !s.kept("example.com") {
				t.Fatal("a cached domain's reply is not kept")
			}
			before := s.src.txtLookups()
			for range 100 {
				s.ask(t, "example.com", mx1)
			}
			if n := s.src.txtLookups(); n != before {
				t.Errorf("hot lookups made %d TXT lookups", n-before)
			}
		})
	})
	t.Run("refreshed policy", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, true)
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.src.set("id2", "mx2.example.com", time.Hour)
			if _, err := s.cache.RefreshNow(t.Context(), "example.com"); err != nil {
				t.Fatal(err)
			}
			s.ask(t, "example.com", mx2)
		})
	})
	t.Run("purged", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, true)
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.src.set("", "", 0) // the domain withdraws its record
			if _, err := s.cache.Purge(t.Context(), "example.com"); err != nil {
				t.Fatal(err)
			}
			s.ask(t, "example.com", socketmap.NotFound())
		})
	})
	t.Run("expired policy", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, false)
			s.src.set("id1", "mx1.example.com", 10*time.Second)
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.src.set("", "", 0)
			// Past max_age the policy is gone (nothing refreshed it: the
			// record is withdrawn), although hotTTL has not passed.
			time.Sleep(11 * time.Second)
			s.ask(t, "example.com", socketmap.NotFound())
		})
	})
	t.Run("DANE result changes", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, true)
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.dns.secure.Store(true)
			// The DANE result (TTL one hour) is refreshed in its last
			// quarter: a lookup then starts the refresh, and the next
			// one sees its result.
			time.Sleep(46 * time.Minute)
			s.h.ServeSocketmap(t.Context(), "postfix", "example.com")
			synctest.Wait()
			s.ask(t, "example.com", socketmap.OK("dane-only"))
		})
	})
	t.Run("DANE result evicted", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, false)
			d := dane.New(s.dns, dane.Config{Logger: fixture.QuietLogger(), Size: 1})
			defer d.Close()
			s.h.DANE = d
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.dns.secure.Store(true)
			// Another domain's check takes the DANE cache's one place;
			// example.com's is checked anew.
			s.ask(t, "other.example", socketmap.OK("dane-only"))
			s.ask(t, "example.com", socketmap.OK("dane-only"))
		})
	})
	t.Run("settings change", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, true)
			s.ask(t, "example.com", mx1)
			s.ask(t, "example.com", mx1)
			s.settings.Store(&Settings{Servername: true})
			s.ask(t, "example.com", socketmap.OK("secure match=mx1.example.com servername=hostname"))
		})
	})
	t.Run("map names in turn", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			s := newHotStack(t, false)
			s.h.Settings = func(name string) Settings { return Settings{Servername: name == "sni"} }
			s.ask(t, "example.com", mx1)
			for range 3 {
				for _, name := range []string{"plain", "sni"} {
					want := mx1
					if name == "sni" {
						want = socketmap.OK("secure match=mx1.example.com servername=hostname")
					}
					if got := s.h.ServeSocketmap(t.Context(), name, "example.com"); got != want {
						t.Fatalf("map %s: got %+v, want %+v", name, got, want)
					}
				}
			}
		})
	})
}

// Lookups in parallel with refreshes that change the policy: once a
// refresh has returned, no lookup answers an older policy.
func TestHotConcurrentRefresh(t *testing.T) {
	s := newHotStack(t, true)
	s.src.set("id0", "mx0.example.com", time.Hour)
	for range 2 {
		if r, want := s.h.ServeSocketmap(t.Context(), "postfix", "example.com"), socketmap.OK("secure match=mx0.example.com"); r != want {
			t.Fatalf("got %+v, want %+v", r, want)
		}
	}
	var latest atomic.Int64 // the newest policy a refresh has returned
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				floor := latest.Load()
				r := s.h.ServeSocketmap(t.Context(), "postfix", "example.com")
				var n int64
				if _, err := fmt.Sscanf(r.Data, "secure match=mx%d.example.com", &n); err != nil || n < floor {
					t.Errorf("got %+v after policy %d was in force", r, floor)
					return
				}
			}
		})
	}
	for i := int64(1); i <= 200; i++ {
		s.src.set(fmt.Sprint("id", i), fmt.Sprintf("mx%d.example.com", i), time.Hour)
		if _, err := s.cache.RefreshNow(t.Context(), "example.com"); err != nil {
			t.Fatal(err)
		}
		latest.Store(i)
	}
	close(stop)
	wg.Wait()
}

// A first contact that outlasts its wait is answered NOTFOUND, and that
// answer is not kept: the next lookup has the policy.
func TestHotFirstContactNotKept(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cache := policycache.New(slowSource{delay: 10 * time.Second, mx: "mx.example.com"},
			policycache.Config{Logger: fixture.QuietLogger(), FirstContactTimeout: time.Second})
		defer cache.Close()
		h := &Handler{Cache: cache, Settings: func(string) Settings { return Settings{} }}
		if got := h.ServeSocketmap(t.Context(), "postfix", "example.com"); got != socketmap.NotFound() {
			t.Fatalf("first contact: got %+v, want NOTFOUND", got)
		}
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if got, want := h.ServeSocketmap(t.Context(), "postfix", "example.com"), socketmap.OK("secure match=mx.example.com"); got != want {
			t.Fatalf("after the discovery: got %+v, want %+v", got, want)
		}
	})
}

// Lookups answered from the hot table count as cache hits, and the caches
// are asked again within hotTTL: the entry's LastUsed (which decides when
// an idle domain stops being refreshed) keeps moving.
func TestHotKeepsCacheBookkeeping(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newHotStack(t, true)
		s.ask(t, "example.com", socketmap.OK("secure match=mx1.example.com"))
		hits := s.obs.hits.Load()
		for range 10 {
			s.h.ServeSocketmap(t.Context(), "postfix", "example.com")
		}
		if got := s.obs.hits.Load() - hits; got != 10 {
			t.Errorf("10 hot lookups counted %d cache hits", got)
		}
		e, _ := s.cache.Peek("example.com")
		first := e.LastUsed.Load()
		// Five minutes of a lookup a second.
		for range 300 {
			time.Sleep(time.Second)
			s.h.ServeSocketmap(t.Context(), "postfix", "example.com")
		}
		if moved := e.LastUsed.Load() - first; moved < 240 {
			t.Errorf("LastUsed moved %d s in 300 s of lookups, want at least 240", moved)
		}
	})
}

// The table holds at most HotSize replies.
func TestHotSize(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newHotStack(t, false)
		s.h.HotSize = 16
		for i := range 100 {
			key := fmt.Sprintf("d%d.example", i)
			s.ask(t, key, socketmap.OK("secure match=mx1.example.com"))
			s.ask(t, key, socketmap.OK("secure match=mx1.example.com"))
			if n := len(s.h.hot.m); n > 16 {
				t.Fatalf("after %d domains: %d replies kept, want at most 16", i+1, n)
			}
		}
		if !s.kept("d99.example") {
			t.Error("the newest reply is not kept")
		}
	})
}

// A DANE result is asked for again when its refresh is due, not only
// every hotTTL: a result of one minute (refreshed in its last 15 seconds)
// is refreshed in the background before it expires, and no lookup waits
// on DNS after the first.
func TestHotDANERefreshInTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newHotStack(t, false)
		dns := &hotDNS{delay: 100 * time.Millisecond, ttl: time.Minute}
		d := dane.New(dns, dane.Config{Logger: fixture.QuietLogger()})
		defer d.Close()
		s.h.DANE = d
		s.ask(t, "example.com", socketmap.OK("secure match=mx1.example.com"))
		for i := range 300 {
			time.Sleep(time.Second)
			start := time.Now()
			s.h.ServeSocketmap(t.Context(), "postfix", "example.com")
			if waited := time.Since(start); waited > 0 {
				t.Fatalf("lookup %d s after the first waited %v", i+1, waited)
			}
			synctest.Wait()
		}
	})
}

// lyingCache is a policy cache whose Lookup returns an entry it has not
// cached (as a discovery that outlasts its wait does), with stamps that
// never turn stale: such a reply must not be kept.
type lyingCache struct{ cached, other *policycache.Entry }

func (c lyingCache) Lookup(context.Context, string) *policycache.Entry { return c.other }
func (c lyingCache) Stamp(string) stamp.Stamp                          { return stamp.Stamp{} }
func (c lyingCache) Peek(string) (*policycache.Entry, bool)            { return c.cached, true }
func (c lyingCache) CountHit()                                         {}

func TestHotKeepsOnlyCachedEntries(t *testing.T) {
	other := &policycache.Entry{Domain: "example.com", Reason: policycache.ReasonPolicy, Expires: time.Now().Add(time.Hour),
		Policy: &resolver.Policy{Mode: resolver.ModeEnforce, MX: []string{"mx.example.com"}}}
	h := &Handler{Cache: lyingCache{cached: &policycache.Entry{}, other: other}, Settings: func(string) Settings { return Settings{} }}
	h.ServeSocketmap(t.Context(), "postfix", "example.com")
	if _, ok := h.hot.m["example.com"]; ok {
		t.Error("a reply from an entry the cache does not hold was kept")
	}
}

// A huge answer is rendered each time, not kept (maxKeptAnswer).
func TestHotHugeAnswerNotKept(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newHotStack(t, false)
		var mx []string
		for i := range 300 {
			mx = append(mx, fmt.Sprintf("mx%d.example.com", i))
		}
		s.src.set("id1", strings.Join(mx, " "), time.Hour)
		want, _ := Answer("example.com", &resolver.Policy{Mode: resolver.ModeEnforce, MX: mx}, Settings{})
		if len(want) <= maxKeptAnswer {
			t.Fatalf("the answer is %d bytes, want a test answer over %d", len(want), maxKeptAnswer)
		}
		s.ask(t, "example.com", socketmap.OK(want))
		if s.kept("example.com") {
			t.Error("an answer over maxKeptAnswer is kept")
		}
		s.src.set("id1", "mx1.example.com", time.Hour)
		s.ask(t, "small.example", socketmap.OK("secure match=mx1.example.com"))
		if !s.kept("small.example") {
			t.Error("an answer under maxKeptAnswer is not kept")
		}
	})
}

// hotReply stays small enough for the map to hold it in place.
func TestHotReplySize(t *testing.T) {
	if n := unsafe.Sizeof(hotReply{}); n > 128 {
		t.Errorf("hotReply is %d bytes, want at most 128", n)
	}
}
