package dane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/miekg/dns"

	"stsmap/internal/fixture"
	"stsmap/resolver"
)

// digest is SHA2-256 sized association data, in hex.
var digest = strings.Repeat("ab", 32)

// tlsa is a usable TLSA record (3 1 1) at name.
func tlsa(name string) string { return name + ". 300 IN TLSA 3 1 1 " + digest }

// newFixtureChecker returns a Checker querying a fresh fixture DNS server
// through resolver.DNS, as the daemon does.
func newFixtureChecker(t *testing.T, cfg Config) (*Checker, *fixture.DNS) {
	t.Helper()
	d := fixture.NewDNS(t)
	if cfg.Logger == nil {
		cfg.Logger = fixture.QuietLogger()
	}
	c := New(resolver.NewDNS([]string{d.Addr}, 2*time.Second), cfg)
	t.Cleanup(c.Close)
	return c, d
}

// wantQueries checks how many queries for name the server answered.
func wantQueries(t *testing.T, d *fixture.DNS, name string, want int) {
	t.Helper()
	if got := d.QueriesFor(name); got != want {
		t.Errorf("queries for %s = %d, want %d", name, got, want)
	}
}

// twoMX publishes example.com with MX hosts mx1 and mx2.example.com.
func twoMX(t *testing.T, d *fixture.DNS) {
	t.Helper()
	d.Add(t,
		`example.com. 300 IN MX 10 mx1.example.com.`,
		`example.com. 300 IN MX 20 mx2.example.com.`,
		`mx1.example.com. 300 IN A 192.0.2.1`,
		`mx2.example.com. 300 IN A 192.0.2.2`)
}

// twoMXWithTLSA publishes twoMX and a usable TLSA record for port at each
// of the two hosts.
func twoMXWithTLSA(t *testing.T, d *fixture.DNS, port int) {
	t.Helper()
	twoMX(t, d)
	for _, h := range []string{"mx1.example.com", "mx2.example.com"} {
		d.Add(t, tlsa(fmt.Sprintf("_%d._tcp.%s", port, h)))
	}
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, d *fixture.DNS)
		nexthop string // default example.com
		port    int
		host    bool
		want    Level
		wantErr error
		// check, when set, looks at the queries made.
		check func(t *testing.T, d *fixture.DNS)
	}{
		{
			name: "every MX host has usable TLSA",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 25)
				d.SetAuthentic("example.com", true)
			},
			want: DaneOnly,
		},
		{
			name: "some MX hosts have usable TLSA",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMX(t, d)
				d.Add(t, tlsa("_25._tcp.mx2.example.com"))
				d.SetAuthentic("example.com", true)
			},
			want: Dane,
		},
		{
			name: "no TLSA",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMX(t, d)
				d.SetAuthentic("example.com", true)
			},
			want: None,
			check: func(t *testing.T, d *fixture.DNS) {
				wantQueries(t, d, "_25._tcp.mx1.example.com", 1)
				wantQueries(t, d, "_25._tcp.mx2.example.com", 1)
			},
		},
		{
			name: "unusable TLSA parameters",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMX(t, d)
				d.Add(t,
					`_25._tcp.mx1.example.com. 300 IN TLSA 1 1 1 `+digest, // PKIX-EE
					`_25._tcp.mx2.example.com. 300 IN TLSA 3 1 3 `+digest, // unknown matching type
				)
				d.SetAuthentic("example.com", true)
			},
			want: None,
		},
		{
			name: "usable among unusable TLSA records",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMX(t, d)
				d.Add(t,
					`_25._tcp.mx1.example.com. 300 IN TLSA 0 0 1 `+digest,
					tlsa("_25._tcp.mx1.example.com"),
					tlsa("_25._tcp.mx2.example.com"))
				d.SetAuthentic("example.com", true)
			},
			want: DaneOnly,
		},
		{
			name: "MX not authenticated: no TLSA lookups",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 25)
			},
			want: None,
			check: func(t *testing.T, d *fixture.DNS) {
				wantQueries(t, d, "example.com", 1)
				wantQueries(t, d, "_25._tcp.mx1.example.com", 0)
				wantQueries(t, d, "_25._tcp.mx2.example.com", 0)
			},
		},
		{
			name: "TLSA not authenticated",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `example.com. 300 IN MX 10 mx.example.net.`, tlsa("_25._tcp.mx.example.net"))
				d.SetAuthentic("example.com", true)
			},
			want: None,
		},
		{
			name: "TLSA SERVFAIL",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 25)
				d.SetAuthentic("example.com", true)
				d.SetRcode("_25._tcp.mx2.example.com", dns.TypeTLSA, dns.RcodeServerFailure)
			},
			want:    Temp,
			wantErr: ErrTLSALookup,
		},
		{
			name: "TLSA SERVFAIL with the MX not authenticated",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMX(t, d)
				d.SetRcode("_25._tcp.mx2.example.com", dns.TypeTLSA, dns.RcodeServerFailure)
			},
			want: None,
		},
		{
			name: "implicit MX",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `example.com. 300 IN A 192.0.2.1`, tlsa("_25._tcp.example.com"))
				d.SetAuthentic("example.com", true)
			},
			want: DaneOnly,
		},
		{
			name: "implicit MX not authenticated",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `example.com. 300 IN A 192.0.2.1`, tlsa("_25._tcp.example.com"))
			},
			want:  None,
			check: func(t *testing.T, d *fixture.DNS) { wantQueries(t, d, "_25._tcp.example.com", 0) },
		},
		{
			name: "CNAME at the TLSA name followed",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t,
					`example.com. 300 IN MX 10 mx.example.com.`,
					`_25._tcp.mx.example.com. 300 IN CNAME _25._tcp.mx.example.net.`,
					tlsa("_25._tcp.mx.example.net"))
				d.SetAuthentic("example.com", true)
				d.SetAuthentic("example.net", true)
			},
			want: DaneOnly,
		},
		{
			name: "CNAME at the TLSA name into an unsigned zone",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t,
					`example.com. 300 IN MX 10 mx.example.com.`,
					`_25._tcp.mx.example.com. 300 IN CNAME _25._tcp.mx.example.net.`,
					tlsa("_25._tcp.mx.example.net"))
				d.SetAuthentic("example.com", true)
			},
			want: None,
		},
		{
			// TLSA records are looked up at the MX host name as the MX
			// record gives it, not at its CNAME target (see Check).
			name: "MX host is a CNAME, TLSA at its name",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t,
					`example.com. 300 IN MX 10 mx.example.com.`,
					`mx.example.com. 300 IN CNAME real.example.net.`,
					`real.example.net. 300 IN A 192.0.2.1`,
					tlsa("_25._tcp.mx.example.com"))
				d.SetAuthentic("example.com", true)
				d.SetAuthentic("example.net", true)
			},
			want: DaneOnly,
		},
		{
			name: "MX host is a CNAME, TLSA only at its target",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t,
					`example.com. 300 IN MX 10 mx.example.com.`,
					`mx.example.com. 300 IN CNAME real.example.net.`,
					`real.example.net. 300 IN A 192.0.2.1`,
					tlsa("_25._tcp.real.example.net"))
				d.SetAuthentic("example.com", true)
				d.SetAuthentic("example.net", true)
			},
			want:  None,
			check: func(t *testing.T, d *fixture.DNS) { wantQueries(t, d, "_25._tcp.real.example.net", 0) },
		},
		{
			name: "null MX",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `example.com. 300 IN MX 0 .`, tlsa("_25._tcp.example.com"))
				d.SetAuthentic("example.com", true)
			},
			want:  None,
			check: func(t *testing.T, d *fixture.DNS) { wantQueries(t, d, "_25._tcp.example.com", 0) },
		},
		{
			name: "NXDOMAIN",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.SetAuthentic("example.com", true)
			},
			want: None,
		},
		{
			name: "MX SERVFAIL",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 25)
				d.SetAuthentic("example.com", true)
				d.SetRcode("example.com", dns.TypeMX, dns.RcodeServerFailure)
			},
			want: None,
		},
		{
			name: "bracketed host on port 587",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `mx.example.com. 300 IN A 192.0.2.1`, tlsa("_587._tcp.mx.example.com"))
				d.SetAuthentic("example.com", true)
			},
			nexthop: "mx.example.com",
			port:    587,
			host:    true,
			want:    DaneOnly,
			check: func(t *testing.T, d *fixture.DNS) {
				wantQueries(t, d, "mx.example.com", 0) // no MX lookup
				wantQueries(t, d, "_587._tcp.mx.example.com", 1)
				wantQueries(t, d, "_25._tcp.mx.example.com", 0)
			},
		},
		{
			name: "bracketed host with TLSA for another port",
			setup: func(t *testing.T, d *fixture.DNS) {
				d.Add(t, `mx.example.com. 300 IN A 192.0.2.1`, tlsa("_25._tcp.mx.example.com"))
				d.SetAuthentic("example.com", true)
			},
			nexthop: "mx.example.com",
			port:    587,
			host:    true,
			want:    None,
		},
		{
			name: "domain on port 587",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 587)
				d.SetAuthentic("example.com", true)
			},
			port: 587,
			want: DaneOnly,
		},
		{
			name: "next hop in upper case with a trailing dot",
			setup: func(t *testing.T, d *fixture.DNS) {
				twoMXWithTLSA(t, d, 25)
				d.SetAuthentic("example.com", true)
			},
			nexthop: "Example.COM.",
			want:    DaneOnly,
		},
		{
			name: "MX host too long for a TLSA name",
			setup: func(t *testing.T, d *fixture.DNS) {
				long := strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 45) + ".example.com"
				d.Add(t, `example.com. 300 IN MX 10 `+long+`.`, `example.com. 300 IN MX 20 mx1.example.com.`,
					tlsa("_25._tcp.mx1.example.com"))
				d.SetAuthentic("example.com", true)
			},
			want: Dane,
		},
		{
			name: "at most 16 MX hosts considered",
			setup: func(t *testing.T, d *fixture.DNS) {
				for i := range 20 {
					d.Add(t, fmt.Sprintf("example.com. 300 IN MX %d mx%d.example.com.", i, i))
					if i < 16 {
						d.Add(t, tlsa(fmt.Sprintf("_25._tcp.mx%d.example.com", i)))
					}
				}
				d.SetAuthentic("example.com", true)
			},
			want: DaneOnly,
			check: func(t *testing.T, d *fixture.DNS) {
				wantQueries(t, d, "_25._tcp.mx15.example.com", 1)
				wantQueries(t, d, "_25._tcp.mx16.example.com", 0)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, d := newFixtureChecker(t, Config{})
			tt.setup(t, d)
			nexthop := tt.nexthop
			if nexthop == "" {
				nexthop = "example.com"
			}
			got, err := c.Check(t.Context(), nexthop, tt.port, tt.host)
			if got != tt.want {
				t.Errorf("Check = %v, want %v", got, tt.want)
			}
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("error = %v, want %v", err, tt.wantErr)
			}
			if tt.check != nil {
				tt.check(t, d)
			}
		})
	}
}

// TestCheckErrorTextFixed: the error of Temp is safe to send to Postfix:
// no name or rcode from DNS.
func TestCheckErrorTextFixed(t *testing.T) {
	c, d := newFixtureChecker(t, Config{})
	d.Add(t, `example.com. 300 IN MX 10 mx.example.com.`)
	d.SetAuthentic("example.com", true)
	d.SetRcode("_25._tcp.mx.example.com", dns.TypeTLSA, dns.RcodeServerFailure)
	_, err := c.Check(t.Context(), "example.com", 25, false)
	if err == nil || err.Error() != "dane: TLSA lookup failed" {
		t.Fatalf("error = %v, want dane: TLSA lookup failed", err)
	}
}

// clock is an injected Now that tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestCacheLifetime: a result is served from the cache, without DNS, for
// the smallest TTL of its records clamped to [MinTTL, MaxTTL] (30 s for
// Temp), and looked up again once expired. The checks stay out of the last
// quarter of the lifetime, where a background refresh would start.
func TestCacheLifetime(t *testing.T) {
	tests := []struct {
		name     string
		ttl      int           // of every record
		servfail bool          // TLSA SERVFAIL: Temp
		lifetime time.Duration // expected
	}{
		{name: "TTL in range", ttl: 600, lifetime: 10 * time.Minute},
		{name: "TTL below MinTTL", ttl: 5, lifetime: time.Minute},
		{name: "TTL above MaxTTL", ttl: 86400, lifetime: time.Hour},
		{name: "Temp", ttl: 600, servfail: true, lifetime: 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			c, d := newFixtureChecker(t, Config{MinTTL: time.Minute, MaxTTL: time.Hour, Now: clk.Now})
			d.Add(t,
				fmt.Sprintf("example.com. %d IN MX 10 mx.example.com.", tt.ttl),
				fmt.Sprintf("_25._tcp.mx.example.com. %d IN TLSA 3 1 1 %s", tt.ttl, digest))
			d.SetAuthentic("example.com", true)
			if tt.servfail {
				d.SetRcode("_25._tcp.mx.example.com", dns.TypeTLSA, dns.RcodeServerFailure)
			}
			want := DaneOnly
			if tt.servfail {
				want = Temp
			}
			check := func(wantMX int) {
				t.Helper()
				if got, _ := c.Check(t.Context(), "example.com", 25, false); got != want {
					t.Fatalf("Check = %v, want %v", got, want)
				}
				if got := d.QueriesFor("example.com"); got != wantMX {
					t.Fatalf("MX queries = %d, want %d", got, wantMX)
				}
			}
			check(1)
			check(1) // from the cache
			before := d.Queries()
			clk.Advance(tt.lifetime * 3 / 4)
			clk.Advance(-time.Second)
			check(1)
			if got := d.Queries(); got != before {
				t.Fatalf("queries = %d after a cache hit, want %d", got, before)
			}
			clk.Advance(tt.lifetime/4 + time.Second)
			check(2) // expired
		})
	}
}

// fakeResolver answers from maps, counts lookups and can hold them: for
// tests of the cache, where the network adds nothing.
type fakeResolver struct {
	mu       sync.Mutex
	mx       map[string]fakeMX
	tlsa     map[string]fakeTLSA
	calls    map[string]int // "MX name", "TLSA name"
	hold     chan struct{}  // when set, lookups wait until it is closed or ctx ends
	holdOnly string         // when set, only lookups whose key has this prefix wait
	inflight int
	peak     int // most lookups running at once
}

type fakeMX struct {
	hosts []string
	ans   resolver.Answer
	err   error
}

type fakeTLSA struct {
	records []resolver.TLSA
	ans     resolver.Answer
	err     error
}

var goodTLSA = resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 1, Data: bytes.Repeat([]byte{0xab}, 32)}

func newFakeResolver() *fakeResolver {
	return &fakeResolver{mx: map[string]fakeMX{}, tlsa: map[string]fakeTLSA{}, calls: map[string]int{}}
}

// daneDomain makes domain's one MX host mx.<domain> have usable TLSA, with
// records of the given TTL.
func (f *fakeResolver) daneDomain(domain string, ttl time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	auth := resolver.Answer{Authentic: true, TTL: ttl}
	f.mx[domain] = fakeMX{hosts: []string{"mx." + domain}, ans: auth}
	f.tlsa["_25._tcp.mx."+domain] = fakeTLSA{records: []resolver.TLSA{goodTLSA}, ans: auth}
}

func (f *fakeResolver) setTLSA(name string, v fakeTLSA) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tlsa[name] = v
}

func (f *fakeResolver) setHold(hold chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold = hold
}

func (f *fakeResolver) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[key]
}

// enter records a lookup and waits while lookups are held.
func (f *fakeResolver) enter(ctx context.Context, key string) error {
	f.mu.Lock()
	f.calls[key]++
	f.inflight++
	f.peak = max(f.peak, f.inflight)
	hold := f.hold
	if !strings.HasPrefix(key, f.holdOnly) {
		hold = nil
	}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inflight--
		f.mu.Unlock()
	}()
	if hold == nil {
		return nil
	}
	select {
	case <-hold:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", resolver.ErrDNS, ctx.Err())
	}
}

func (f *fakeResolver) LookupMX(ctx context.Context, domain string) ([]string, resolver.Answer, error) {
	if err := f.enter(ctx, "MX "+domain); err != nil {
		return nil, resolver.Answer{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.mx[domain]
	if !ok {
		return nil, resolver.Answer{Authentic: true}, resolver.ErrNoRecord
	}
	return v.hosts, v.ans, v.err
}

func (f *fakeResolver) LookupTLSA(ctx context.Context, name string) ([]resolver.TLSA, resolver.Answer, error) {
	if err := f.enter(ctx, "TLSA "+name); err != nil {
		return nil, resolver.Answer{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.tlsa[name]
	if !ok {
		return nil, resolver.Answer{Authentic: true}, resolver.ErrNoRecord
	}
	return v.records, v.ans, v.err
}

var _ Resolver = (*fakeResolver)(nil)

func newFakeChecker(t *testing.T, r Resolver, cfg Config) *Checker {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = fixture.QuietLogger()
	}
	c := New(r, cfg)
	t.Cleanup(c.Close)
	return c
}

// wantCheck checks the level of example.com.
func wantCheck(t *testing.T, c *Checker, want Level) {
	t.Helper()
	if got, err := c.Check(t.Context(), "example.com", 25, false); got != want {
		t.Fatalf("Check = %v (%v), want %v", got, err, want)
	}
}

// TestRefreshInLastQuarter: a result used in the last quarter of its
// lifetime is returned at once and refreshed in the background, so a domain
// in use never waits for DNS after its first check.
func TestRefreshInLastQuarter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second) // refresh from 300 s
		c := newFakeChecker(t, r, Config{})
		wantCheck(t, c, DaneOnly)

		time.Sleep(299 * time.Second)
		wantCheck(t, c, DaneOnly)
		synctest.Wait()
		if n := r.count("MX example.com"); n != 1 {
			t.Fatalf("MX lookups before the last quarter = %d, want 1", n)
		}

		// The TLSA records go away; the next refresh learns it.
		r.setTLSA("_25._tcp.mx.example.com", fakeTLSA{err: resolver.ErrNoRecord, ans: resolver.Answer{Authentic: true}})
		time.Sleep(2 * time.Second)
		r.setHold(make(chan struct{}))
		wantCheck(t, c, DaneOnly) // old result, at once, while the refresh is held
		synctest.Wait()
		if n := r.count("MX example.com"); n != 2 {
			t.Fatalf("MX lookups after a use in the last quarter = %d, want 2", n)
		}
		wantCheck(t, c, DaneOnly) // a second use does not start a second refresh
		r.mu.Lock()
		close(r.hold)
		r.hold = nil
		r.mu.Unlock()
		synctest.Wait()
		wantCheck(t, c, None)
		if n := r.count("MX example.com"); n != 2 {
			t.Fatalf("MX lookups = %d, want 2", n)
		}
	})
}

// TestConcurrentChecksShareOneLookup: 200 checks of one next hop at once
// make one lookup, on a miss and on a refresh.
func TestConcurrentChecksShareOneLookup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		c := newFakeChecker(t, r, Config{})
		hold := make(chan struct{})
		r.setHold(hold)

		checkAll := func() {
			var wg sync.WaitGroup
			for range 200 {
				wg.Go(func() { wantCheck(t, c, DaneOnly) })
			}
			synctest.Wait()
			r.mu.Lock()
			if r.hold != nil {
				close(r.hold)
				r.hold = nil
			}
			r.mu.Unlock()
			wg.Wait()
			synctest.Wait()
		}
		checkAll()
		if n := r.count("MX example.com"); n != 1 {
			t.Fatalf("MX lookups for 200 concurrent misses = %d, want 1", n)
		}

		time.Sleep(350 * time.Second)
		r.setHold(make(chan struct{}))
		checkAll()
		if n := r.count("MX example.com"); n != 2 {
			t.Fatalf("MX lookups after 200 concurrent hits in the last quarter = %d, want 2", n)
		}
	})
}

// TestRefreshFailureKeepsLevel: a refresh that fails keeps the level learned
// before until it expires, and is retried after 30 s, not on every use.
func TestRefreshFailureKeepsLevel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		c := newFakeChecker(t, r, Config{})
		wantCheck(t, c, DaneOnly)

		r.setTLSA("_25._tcp.mx.example.com", fakeTLSA{err: fmt.Errorf("%w: SERVFAIL", resolver.ErrDNS)})
		time.Sleep(301 * time.Second)
		wantCheck(t, c, DaneOnly) // starts a refresh, which fails
		synctest.Wait()
		wantCheck(t, c, DaneOnly)
		synctest.Wait()
		if n := r.count("MX example.com"); n != 2 {
			t.Fatalf("MX lookups = %d, want 2: no retry within 30 s", n)
		}
		time.Sleep(31 * time.Second)
		wantCheck(t, c, DaneOnly)
		synctest.Wait()
		if n := r.count("MX example.com"); n != 3 {
			t.Fatalf("MX lookups = %d, want 3: a retry after 30 s", n)
		}

		time.Sleep(2 * time.Minute) // past the 400 s lifetime
		got, err := c.Check(t.Context(), "example.com", 25, false)
		if got != Temp || !errors.Is(err, ErrTLSALookup) {
			t.Fatalf("Check after expiry = %v, %v; want temp, %v", got, err, ErrTLSALookup)
		}
	})
}

// TestCheckReturnsWhenContextEnds: a check waits for a lookup no longer
// than its context; the lookup goes on and its result is cached.
func TestCheckReturnsWhenContextEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		c := newFakeChecker(t, r, Config{})
		hold := make(chan struct{})
		r.setHold(hold)

		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		got, err := c.Check(ctx, "example.com", 25, false)
		if got != Temp || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Check = %v, %v; want temp, %v", got, err, context.DeadlineExceeded)
		}
		close(hold)
		synctest.Wait()
		wantCheck(t, c, DaneOnly)
		if n := r.count("MX example.com"); n != 1 {
			t.Fatalf("MX lookups = %d, want 1", n)
		}
	})
}

// TestLookupBoundedByTimeout: background DNS work ends after 30 s even when
// the resolver never answers.
func TestLookupBoundedByTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		r.setHold(make(chan struct{}))
		c := newFakeChecker(t, r, Config{})
		start := time.Now()
		got, _ := c.Check(t.Context(), "example.com", 25, false)
		if got != None { // the MX lookup failed
			t.Fatalf("Check = %v, want none", got)
		}
		if elapsed := time.Since(start); elapsed != 30*time.Second {
			t.Fatalf("Check took %v, want 30s", elapsed)
		}
	})
}

// TestCloseCancelsAndWaits: Close ends running lookups and waits for them;
// later misses answer Temp with ErrClosed, without DNS.
func TestCloseCancelsAndWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		r.daneDomain("example.com", 400*time.Second)
		r.daneDomain("example.org", 400*time.Second)
		r.setHold(make(chan struct{}))
		c := New(r, Config{Logger: fixture.QuietLogger()})
		done := make(chan error, 1)
		go func() {
			_, err := c.Check(context.Background(), "example.com", 25, false)
			done <- err
		}()
		synctest.Wait()
		c.Close()
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Fatalf("Check during Close: error = %v, want %v", err, ErrClosed)
		}
		got, err := c.Check(t.Context(), "example.org", 25, false)
		if got != Temp || !errors.Is(err, ErrClosed) {
			t.Fatalf("Check after Close = %v, %v; want temp, %v", got, err, ErrClosed)
		}
		if n := r.count("MX example.org"); n != 0 {
			t.Fatalf("MX lookups after Close = %d, want 0", n)
		}
	})
}

// TestTLSALookupsBounded: at most 8 TLSA lookups of one check run at once,
// and at most 16 MX hosts are considered.
func TestTLSALookupsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newFakeResolver()
		var hosts []string
		for i := range 20 {
			h := fmt.Sprintf("mx%d.example.com", i)
			hosts = append(hosts, h)
			r.setTLSA("_25._tcp."+h, fakeTLSA{records: []resolver.TLSA{goodTLSA}, ans: resolver.Answer{Authentic: true, TTL: time.Hour}})
		}
		r.mx["example.com"] = fakeMX{hosts: hosts, ans: resolver.Answer{Authentic: true, TTL: time.Hour}}
		c := newFakeChecker(t, r, Config{})

		hold := make(chan struct{})
		r.holdOnly = "TLSA "
		r.setHold(hold)
		res := make(chan Level, 1)
		go func() {
			l, _ := c.Check(t.Context(), "example.com", 25, false)
			res <- l
		}()
		synctest.Wait() // the first TLSA lookups are held
		r.mu.Lock()
		running := r.inflight
		r.mu.Unlock()
		if running != maxTLSALookups {
			t.Errorf("TLSA lookups running at once = %d, want %d", running, maxTLSALookups)
		}
		close(hold)
		if got := <-res; got != DaneOnly {
			t.Fatalf("Check = %v, want dane-only", got)
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.peak > maxTLSALookups {
			t.Errorf("lookups at once = %d, want at most %d", r.peak, maxTLSALookups)
		}
		n := 0
		for k, v := range r.calls {
			if strings.HasPrefix(k, "TLSA ") {
				n += v
			}
		}
		if n != maxHosts {
			t.Errorf("TLSA lookups = %d, want %d", n, maxHosts)
		}
	})
}

// TestLogsLevelChanges: one info line per change of level, none per cache
// hit, none for a domain that never had DANE; failures logged bounded.
func TestLogsLevelChanges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf bytes.Buffer
		logger := slog.New(slog.NewTextHandler(&buf, nil))
		r := newFakeResolver()
		r.daneDomain("example.com", 100*time.Second)
		r.mx["plain.example"] = fakeMX{hosts: []string{"mx.plain.example"}}
		c := newFakeChecker(t, r, Config{Logger: logger})

		wantCheck(t, c, DaneOnly)
		for range 100 {
			wantCheck(t, c, DaneOnly)
		}
		if _, err := c.Check(t.Context(), "plain.example", 25, false); err != nil {
			t.Fatal(err)
		}
		r.setTLSA("_25._tcp.mx.example.com", fakeTLSA{err: fmt.Errorf("%w: %s", resolver.ErrDNS, strings.Repeat("x", 1000))})
		time.Sleep(2 * time.Minute)
		got, _ := c.Check(t.Context(), "example.com", 25, false)
		if got != Temp {
			t.Fatalf("Check = %v, want temp", got)
		}

		lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
		want := []string{
			`level=INFO msg="DANE level changed" domain=example.com port=25 old=none new=dane-only`,
			`level=WARN msg="DANE TLSA lookup failed" domain=example.com port=25 err=`,
			`level=INFO msg="DANE level changed" domain=example.com port=25 old=dane-only new=temp`,
		}
		if len(lines) != len(want) {
			t.Fatalf("log:\n%s\nwant %d lines", buf.String(), len(want))
		}
		for i, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("log line %d = %s, want it to contain %s", i, lines[i], w)
			}
			if len(lines[i]) > 400 {
				t.Errorf("log line %d is %d bytes long: not bounded", i, len(lines[i]))
			}
		}
	})
}

func TestLevelString(t *testing.T) {
	for l, want := range map[Level]string{None: "none", Dane: "dane", DaneOnly: "dane-only", Temp: "temp", Level(9): "Level(9)"} {
		if got := l.String(); got != want {
			t.Errorf("Level(%d).String() = %q, want %q", int(l), got, want)
		}
	}
}

func TestUsable(t *testing.T) {
	sha256 := bytes.Repeat([]byte{1}, 32)
	sha512 := bytes.Repeat([]byte{1}, 64)
	tests := []struct {
		tlsa resolver.TLSA
		want bool
	}{
		{resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 1, Data: sha256}, true},
		{resolver.TLSA{Usage: 2, Selector: 0, MatchingType: 2, Data: sha512}, true},
		{resolver.TLSA{Usage: 3, Selector: 0, MatchingType: 0, Data: []byte{0x30, 0x82}}, true},
		{resolver.TLSA{Usage: 0, Selector: 1, MatchingType: 1, Data: sha256}, false}, // PKIX-TA
		{resolver.TLSA{Usage: 1, Selector: 1, MatchingType: 1, Data: sha256}, false}, // PKIX-EE
		{resolver.TLSA{Usage: 4, Selector: 1, MatchingType: 1, Data: sha256}, false},
		{resolver.TLSA{Usage: 3, Selector: 2, MatchingType: 1, Data: sha256}, false},
		{resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 3, Data: sha256}, false},
		{resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 1, Data: sha512}, false}, // wrong length
		{resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 2, Data: sha256}, false},
		{resolver.TLSA{Usage: 3, Selector: 1, MatchingType: 0}, false},
	}
	for _, tt := range tests {
		if got := usable(tt.tlsa); got != tt.want {
			t.Errorf("usable(%d %d %d, %d bytes) = %v, want %v", tt.tlsa.Usage, tt.tlsa.Selector, tt.tlsa.MatchingType, len(tt.tlsa.Data), got, tt.want)
		}
	}
}
