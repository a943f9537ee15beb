package dane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"stsmap/internal/stamp"
	"stsmap/resolver"
)

// Level is the DANE answer for a next hop.
type Level int

const (
	// None: DANE does not apply. The MX RRset is not DNSSEC-validated (or,
	// for the implicit MX, its denial is not), the domain does not exist
	// or has a null MX, no MX host has usable TLSA records, or the MX
	// lookup failed.
	None Level = iota
	// Dane: some, not all, MX hosts have usable TLSA records. In Postfix's
	// "dane" level the others get opportunistic TLS.
	Dane
	// DaneOnly: every MX host considered has usable TLSA records.
	DaneOnly
	// Temp: the MX RRset is validated but a TLSA lookup failed, so whether
	// the next hop has DANE is not known. Check returns ErrTLSALookup.
	Temp
)

// String returns "none", "dane", "dane-only" or "temp", the first three
// being Postfix's names of the levels.
func (l Level) String() string {
	switch l {
	case None:
		return "none"
	case Dane:
		return "dane"
	case DaneOnly:
		return "dane-only"
	case Temp:
		return "temp"
	}
	return "Level(" + strconv.Itoa(int(l)) + ")"
}

// Errors returned by Check with the Temp level. Their text is fixed and
// safe to send to Postfix; details go to the log.
var (
	// ErrTLSALookup: a TLSA lookup failed (SERVFAIL, timeout) for a next
	// hop whose MX RRset is validated.
	ErrTLSALookup = errors.New("dane: TLSA lookup failed")
	// ErrClosed: the Checker is closed and the result was not cached.
	ErrClosed = errors.New("dane: checker closed")
)

// Resolver is what a Checker needs from DNS. Answers carry the AD bit of
// the validating resolver in Answer.Authentic and the smallest TTL of the
// RRsets used in Answer.TTL.
type Resolver interface {
	// LookupMX returns the MX hosts in preference order: nil for NODATA,
	// an empty slice for a null MX, ErrNoRecord for NXDOMAIN.
	LookupMX(ctx context.Context, domain string) ([]string, resolver.Answer, error)
	// LookupTLSA returns the TLSA records at name, ErrNoRecord for
	// NXDOMAIN or NODATA.
	LookupTLSA(ctx context.Context, name string) ([]resolver.TLSA, resolver.Answer, error)
}

var _ Resolver = (*resolver.DNS)(nil)

const (
	// failureTTL is how long a failed lookup (Temp, or None after a failed
	// MX lookup) is cached: long enough that a broken DNS server does not
	// cost queries per message, short enough that a blip is soon over.
	failureTTL = 30 * time.Second
	// lookupTimeout bounds one check's DNS work, which runs on the
	// Checker's context, never a caller's.
	lookupTimeout = 30 * time.Second
	// maxHosts bounds the MX hosts whose TLSA records are looked up, in
	// preference order. Postfix tries at most smtp_mx_address_limit (5)
	// addresses, so later hosts are hardly ever used.
	maxHosts = 16
	// maxTLSALookups bounds the TLSA lookups of one check running at once.
	maxTLSALookups = 8
	// maxNameLen is the longest domain name in presentation format without
	// the trailing dot (RFC 1035 §2.3.4: 255 octets in wire format).
	maxNameLen = 253
	// maxErrLen bounds error text in logs (SPEC 8.3).
	maxErrLen = 200
)

// Config tunes a Checker; zero values take the defaults noted.
type Config struct {
	// MinTTL and MaxTTL clamp how long a result is cached (0: 1m, 1h). A
	// MaxTTL below MinTTL is raised to MinTTL.
	MinTTL, MaxTTL time.Duration
	// Size is the number of results cached (0: 100000).
	Size int
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// Logger gets level changes and failed lookups (nil: slog.Default()).
	Logger *slog.Logger
}

// Checker answers DANE levels for next hops, with a cache. It is safe for
// concurrent use.
type Checker struct {
	r       Resolver
	cfg     Config
	log     *slog.Logger
	entries *lru.Cache[query, *entry]
	group   singleflight.Group

	// base is the parent of every lookup's context; Close cancels it.
	base   context.Context
	cancel context.CancelFunc
	mu     sync.Mutex // guards closed and wg.Add against Close
	closed bool
	wg     sync.WaitGroup

	stamps stamp.Table // bumped by every change to entries, by name
}

// entry is a cached result. Entries are replaced, never changed, except
// for the refreshing flag.
type entry struct {
	level Level
	err   error
	// failed: a lookup failed; a refresh that fails too does not keep it.
	failed    bool
	expires   time.Time
	refreshAt time.Time // the start of the last quarter of the lifetime
	// refreshing is set by the check that starts the background refresh,
	// so that one refresh runs at a time per entry.
	refreshing atomic.Bool
	// used is when a check last moved the entry to the front of the LRU
	// list, in Unix seconds (see cached).
	used atomic.Int64
}

func (e *entry) result() (Level, error) { return e.level, e.err }

// closedEntry answers checks that find no cached result once the Checker
// is closed; it is never cached.
var closedEntry = &entry{level: Temp, err: ErrClosed, failed: true}

// New returns a Checker that looks up MX and TLSA records through r.
func New(r Resolver, cfg Config) *Checker {
	if cfg.MinTTL <= 0 {
		cfg.MinTTL = time.Minute
	}
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = time.Hour
	}
	cfg.MaxTTL = max(cfg.MaxTTL, cfg.MinTTL)
	if cfg.Size <= 0 {
		cfg.Size = 100000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Checker{r: r, cfg: cfg, log: cfg.Logger}
	// Called for evictions, after the entry is gone; put bumps the stamp
	// of the entries it adds.
	entries, err := lru.NewWithEvict(cfg.Size, func(q query, _ *entry) { c.stamps.Bump(q.name) })
	if err != nil {
		panic(err) // only for a size <= 0, excluded above
	}
	c.entries = entries
	c.base, c.cancel = context.WithCancel(context.Background())
	return c
}

// query is what one check looks up, and the cache key of its result: a
// comparable struct, so that a cache hit needs no key to be built.
type query struct {
	name string // the domain or host, lowercased, without trailing dot
	port int
	host bool
}

// key is the singleflight key of q.
func (q query) key() string {
	kind := "d"
	if q.host {
		kind = "h"
	}
	return kind + strconv.Itoa(q.port) + " " + q.name
}

// Check returns the DANE level of a next hop: nexthop is an A-label domain
// or host name without brackets, port or trailing dot, as policymap
// normalises it; port <= 0 means 25.
//
// For a domain (host false) Check looks up its MX hosts, or uses the
// domain itself when it has no MX RRset (the implicit MX, RFC 5321 §5.1),
// and the TLSA records of each at _<port>._tcp.<host> (RFC 7672 §2.2.3).
// For a host (host true, a bracketed next hop such as [mx.example.com]:587)
// the host is the only one and there is no MX lookup.
//
// TLSA records are looked up at the MX host name as the MX record gives it;
// CNAMEs at the TLSA name itself (_25._tcp.mx.example.com CNAME ...) are
// followed. A host name that is a CNAME is not expanded first, unlike RFC
// 7672 §2.2.2: a host whose TLSA records are only at its CNAME target has
// none here.
//
// A cached result is returned without I/O or allocation; one in the last
// quarter of its lifetime is refreshed in the background. Otherwise a lookup is started,
// or joined when one runs for the same next hop, and Check waits for it
// until ctx ends; then it returns Temp and an error wrapping ctx's error,
// while the lookup goes on and caches its result. The error is nil except
// with Temp.
func (c *Checker) Check(ctx context.Context, nexthop string, port int, host bool) (Level, error) {
	q := newQuery(nexthop, port, host)
	if lvl, _, ok, err := c.cached(q); ok {
		return lvl, err
	}
	select {
	case e := <-c.run(q):
		return e.result()
	case <-ctx.Done():
		return Temp, fmt.Errorf("dane: %w", ctx.Err())
	}
}

// Cached returns what Check would return from the cache, without waiting
// and without allocating, or ok=false when no unexpired result is cached;
// then only Check finds the level. Like Check, it starts the background
// refresh of a result in the last quarter of its lifetime. It lets a caller
// skip setting up a deadline for Check on the common, cached path.
func (c *Checker) Cached(nexthop string, port int, host bool) (lvl Level, ok bool, err error) {
	lvl, _, ok, err = c.cached(newQuery(nexthop, port, host))
	return lvl, ok, err
}

// CachedUntil is Cached, and says until when its answer may be reused
// without asking again: the start of the result's last quarter, when a
// check starts its refresh. It is in the past while a refresh runs.
func (c *Checker) CachedUntil(nexthop string, port int, host bool) (lvl Level, until time.Time, ok bool, err error) {
	return c.cached(newQuery(nexthop, port, host))
}

// Stamp returns a stamp of nexthop's cached results, to be taken before
// they are read (Cached, CachedUntil, Check): it stays current until a
// result for nexthop, on any port, is replaced or evicted.
func (c *Checker) Stamp(nexthop string) stamp.Stamp {
	return c.stamps.Take(newQuery(nexthop, 0, false).name)
}

func newQuery(nexthop string, port int, host bool) query {
	q := query{name: strings.TrimSuffix(strings.ToLower(nexthop), "."), port: port, host: host}
	if q.port <= 0 {
		q.port = 25
	}
	return q
}

// cached returns q's cached, unexpired result, refreshing it in the
// background in the last quarter of its lifetime.
func (c *Checker) cached(q query) (Level, time.Time, bool, error) {
	// Peek, and Get (which moves the entry to the front of the LRU list
	// under the write lock) at most once a minute per entry: per check it
	// cost more than the rest of a cached lookup.
	e, ok := c.entries.Peek(q)
	if !ok {
		return None, time.Time{}, false, nil
	}
	now := c.cfg.Now()
	if !now.Before(e.expires) {
		return None, time.Time{}, false, nil
	}
	if t := now.Unix(); t-e.used.Load() >= 60 {
		e.used.Store(t)
		c.entries.Get(q)
	}
	if !now.Before(e.refreshAt) && e.refreshing.CompareAndSwap(false, true) {
		c.run(q)
	}
	lvl, err := e.result()
	return lvl, e.refreshAt, true, err
}

// Close stops background lookups and waits for them to end. Checks after
// Close answer from the cache, or Temp with ErrClosed.
func (c *Checker) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}

// run starts the lookup of q, or joins the one running for it, and
// delivers the committed entry on the returned channel. The lookup runs on
// the Checker's context, bounded by lookupTimeout, never on a caller's: it
// must outlive a check that stops waiting.
func (c *Checker) run(q query) <-chan *entry {
	// q becomes a cache key: it must not keep the caller's string, of
	// which its name may be a part, alive.
	q.name = strings.Clone(q.name)
	key := q.key()
	out := make(chan *entry, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		out <- closedEntry
		return out
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		v, _, _ := c.group.Do(key, func() (v any, _ error) {
			defer func() {
				// A bug in one lookup must not take the daemon down.
				if p := recover(); p != nil {
					c.log.Error("DANE check panicked", "domain", q.name, "port", q.port, "err", bounded(fmt.Errorf("%v", p)))
					v = &entry{level: Temp, err: ErrTLSALookup, failed: true}
				}
			}()
			ctx, cancel := context.WithTimeout(c.base, lookupTimeout)
			defer cancel()
			o := c.lookup(ctx, q)
			if c.base.Err() != nil {
				// Closing: the lookups were cut short.
				return closedEntry, nil
			}
			return c.commit(q, o), nil
		})
		out <- v.(*entry)
	}()
	return out
}

// outcome is the result of one lookup.
type outcome struct {
	level Level
	// ttl is the smallest TTL of the RRsets used.
	ttl time.Duration
	// err, when set, is why a lookup failed, for the log.
	err error
}

// lookup finds q's level in DNS (RFC 7672 §2.2).
func (c *Checker) lookup(ctx context.Context, q query) outcome {
	hosts := []string{q.name}
	ttl := c.cfg.MaxTTL
	if !q.host {
		mx, ans, err := c.r.LookupMX(ctx, q.name)
		switch {
		case errors.Is(err, resolver.ErrNoRecord):
			// NXDOMAIN: there is nothing to deliver to.
			return outcome{level: None, ttl: ans.TTL}
		case err != nil:
			// None, not Temp: Postfix defers the mail anyway when its
			// own MX lookup fails, and once it gets the MX RRset it does
			// its own TLSA lookups under a dane level. A Temp answer
			// would instead defer every mail of a domain whose DNS
			// merely failed for stsmap, DANE or not.
			return outcome{level: None, err: err}
		case !ans.Authentic:
			// RFC 7672 §2.2.1: DANE needs a secure MX RRset (or a secure
			// denial of it, for the implicit MX). No TLSA lookups, so a
			// resolver that never validates costs one query per domain.
			return outcome{level: None, ttl: ans.TTL}
		case mx == nil:
			// RFC 5321 §5.1 implicit MX, from a validated denial.
		case len(mx) == 0:
			// RFC 7505 null MX: the domain accepts no mail.
			return outcome{level: None, ttl: ans.TTL}
		default:
			hosts = mx[:min(len(mx), maxHosts)]
		}
		ttl = min(ttl, ans.TTL)
	}

	results := make([]hostTLSA, len(hosts))
	var g errgroup.Group
	g.SetLimit(maxTLSALookups)
	for i, h := range hosts {
		g.Go(func() error {
			results[i] = c.lookupTLSA(ctx, h, q.port)
			return nil
		})
	}
	_ = g.Wait()

	usable := 0
	for _, r := range results {
		if r.err != nil {
			// The MX RRset is validated, so the domain may well have
			// DANE: answering None could let MTA-STS override it.
			return outcome{level: Temp, err: r.err}
		}
		ttl = min(ttl, r.ttl)
		if r.usable {
			usable++
		}
	}
	switch usable {
	case 0:
		return outcome{level: None, ttl: ttl}
	case len(hosts):
		return outcome{level: DaneOnly, ttl: ttl}
	}
	return outcome{level: Dane, ttl: ttl}
}

// hostTLSA is what the TLSA lookup of one host found.
type hostTLSA struct {
	usable bool
	ttl    time.Duration
	err    error
}

// lookupTLSA looks up the TLSA records of host's port (RFC 7672 §2.2.3).
// A denial, validated or not, and an unvalidated RRset mean no TLSA: RFC
// 7672 §2.2 uses only secure TLSA records.
func (c *Checker) lookupTLSA(ctx context.Context, host string, port int) hostTLSA {
	name := "_" + strconv.Itoa(port) + "._tcp." + host
	if len(name) > maxNameLen {
		// No such name can exist: the host has no TLSA records.
		return hostTLSA{ttl: c.cfg.MaxTTL}
	}
	records, ans, err := c.r.LookupTLSA(ctx, name)
	switch {
	case errors.Is(err, resolver.ErrNoRecord):
		return hostTLSA{ttl: ans.TTL}
	case err != nil:
		return hostTLSA{err: err}
	case !ans.Authentic:
		return hostTLSA{ttl: ans.TTL}
	}
	return hostTLSA{usable: slices.ContainsFunc(records, usable), ttl: ans.TTL}
}

// usable reports whether t can authenticate an SMTP server (RFC 7672
// §3.1): usage DANE-TA(2) or DANE-EE(3) (§3.1.3: PKIX-TA(0) and PKIX-EE(1)
// are not used by SMTP), selector Cert(0) or SPKI(1), and matching type
// Full(0), SHA2-256(1) or SHA2-512(2) with data that can match: a digest of
// the right length, non-empty full data (RFC 7671 §5).
func usable(t resolver.TLSA) bool {
	if t.Usage != 2 && t.Usage != 3 || t.Selector > 1 {
		return false
	}
	switch t.MatchingType {
	case 0:
		return len(t.Data) > 0
	case 1:
		return len(t.Data) == 32
	case 2:
		return len(t.Data) == 64
	}
	return false
}

// put caches e as q's result at now. Every change to the entries goes
// through put or the LRU's eviction callback, which bump q's stamp.
func (c *Checker) put(q query, e *entry, now time.Time) {
	e.used.Store(now.Unix()) // Add puts it at the front of the LRU list
	c.entries.Add(q, e)
	c.stamps.Bump(q.name)
}

// commit caches the outcome of q's lookup and returns the entry to answer
// with. A failed lookup does not replace an unexpired result learned
// before: that one is served until it expires, and refreshed again after
// failureTTL.
func (c *Checker) commit(q query, o outcome) *entry {
	now := c.cfg.Now()
	old, hadOld := c.entries.Peek(q)
	if o.err != nil {
		if o.level == Temp {
			c.log.Warn("DANE TLSA lookup failed", "domain", q.name, "port", q.port, "err", bounded(o.err))
		} else {
			c.log.Info("DANE MX lookup failed", "domain", q.name, "port", q.port, "err", bounded(o.err))
		}
		if hadOld && !old.failed && now.Before(old.expires) {
			kept := &entry{level: old.level, err: old.err, expires: old.expires, refreshAt: now.Add(failureTTL)}
			c.put(q, kept, now)
			return kept
		}
	}

	lifetime := failureTTL
	if o.err == nil {
		lifetime = min(max(o.ttl, c.cfg.MinTTL), c.cfg.MaxTTL)
	}
	e := &entry{level: o.level, failed: o.err != nil, expires: now.Add(lifetime), refreshAt: now.Add(lifetime - lifetime/4)}
	if o.level == Temp {
		e.err = ErrTLSALookup
	}
	c.put(q, e, now)

	oldLevel := None
	if hadOld {
		oldLevel = old.level
	}
	if e.level != oldLevel {
		c.log.Info("DANE level changed", "domain", q.name, "port", q.port, "old", oldLevel.String(), "new", e.level.String())
	}
	return e
}

// bounded returns err's text cut to maxErrLen bytes: it may quote names
// and rcodes from remote DNS (SPEC 8.3).
func bounded(err error) string {
	s := err.Error()
	if len(s) > maxErrLen {
		s = s[:maxErrLen] + "..."
	}
	return s
}
