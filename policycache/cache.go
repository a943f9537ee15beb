// Package policycache keeps MTA-STS policies in memory and discovers the
// ones it lacks (SPEC section 6 and rules 4.6, 4.7).
//
// It knows entries, expiry and discovery, not the wire: package resolver
// supplies records and policies, package policymap turns an entry into a
// Postfix answer.
//
// A lookup is answered from the in-memory LRU when an unexpired entry exists
// (SPEC 6.1: no network I/O on the hot path). Otherwise one discovery per
// domain runs (concurrent lookups share it, SPEC 4.7), in the background and
// bounded by the fetch timeout, while the lookup waits at most the
// first-contact timeout (SPEC 4.6); a lookup that stops waiting answers "no
// policy" and the next one finds the discovered policy in the cache.
package policycache

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/singleflight"

	"stsmap/internal/stamp"
	"stsmap/resolver"
)

// Source is what the cache needs from a resolver.
type Source interface {
	// LookupRecord finds and parses the domain's _mta-sts TXT record.
	LookupRecord(ctx context.Context, domain string) (resolver.Record, error)
	// FetchPolicy fetches and parses the domain's policy over HTTPS.
	FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error)
}

var _ Source = (*resolver.Resolver)(nil)

// Reason says why an entry has, or has no, policy.
type Reason string

// Reasons, stable strings for logs, JSON and metrics.
const (
	ReasonPolicy        Reason = "policy"            // a policy is cached (any mode)
	ReasonNoRecord      Reason = "no_record"         // no _mta-sts TXT record (SPEC 3.4)
	ReasonInvalidRecord Reason = "invalid_record"    // not exactly one valid STSv1 record (SPEC 3.2)
	ReasonDNSFailure    Reason = "dns_failure"       // SERVFAIL, timeout (SPEC 3.4)
	ReasonFetchFailed   Reason = "fetch_failed"      // HTTPS fetch failed (SPEC 4)
	ReasonInvalidPolicy Reason = "invalid_policy"    // fetched but does not parse (SPEC 5.5)
	ReasonPending       Reason = "discovery_pending" // first-contact deadline passed (SPEC 4.6)
)

// FailureBackoff is how long a failed fetch of one (domain, id) is not
// retried (SPEC 4.7, RFC 8461 §3.3).
const FailureBackoff = 5 * time.Minute

// DNSFailureTTL is how long a failed TXT lookup (SERVFAIL, timeout) is
// remembered, when the negative TTL is not shorter: long enough that a
// broken DNS server does not cost a query per message, short enough that a
// blip does not hide a policy for long.
const DNSFailureTTL = time.Minute

// Entry is what the cache knows of one domain. Entries are immutable once
// stored: a change replaces the whole entry, so readers need no lock.
type Entry struct {
	Domain string
	// ID is the TXT record's id, empty when no valid record was found.
	ID string
	// Policy is nil for a negative entry.
	Policy *resolver.Policy
	Reason Reason
	// Err is the bounded error text of a negative entry.
	Err string
	// Fetched is when the policy was fetched or the outcome learned.
	Fetched time.Time
	// Expires is when the entry stops being served (SPEC 6.2).
	Expires time.Time
	// Checked is when the TXT id was last seen unchanged, or the policy
	// last renewed (SPEC 6.4); zero means at Fetched.
	Checked time.Time
	// FailedID and FailedAt record the last failed refresh: the id whose
	// policy could not be fetched (empty when the TXT lookup itself
	// failed), and when (SPEC 4.7: not retried for FailureBackoff).
	FailedID string
	FailedAt time.Time
	// FailingSince is when the refreshes that are failing now started to
	// fail; zero once a refresh succeeds. A policy whose refresh has
	// failed for long may be blocked by an attacker (RFC 8461 §10.2).
	FailingSince time.Time
	// LastUsed is when Postfix last asked for the domain, in Unix seconds
	// (refresh.idle_after); updated in place, hence atomic.
	LastUsed atomic.Int64
}

// clone returns a copy of e for a change: entries are never modified once
// stored, except LastUsed.
func (e *Entry) clone() *Entry {
	c := &Entry{Domain: e.Domain, ID: e.ID, Policy: e.Policy, Reason: e.Reason, Err: e.Err,
		Fetched: e.Fetched, Expires: e.Expires, Checked: e.Checked, FailedID: e.FailedID, FailedAt: e.FailedAt,
		FailingSince: e.FailingSince}
	c.LastUsed.Store(e.LastUsed.Load())
	return c
}

// Config tunes a Cache; zero values take the defaults noted.
type Config struct {
	Size                int           // 0: 100000
	NegativeTTL         time.Duration // 0: no negative caching
	FirstContactTimeout time.Duration // 0: 5s
	FetchTimeout        time.Duration // 0: 30s
	// Store, when set, receives every policy the cache learns or renews
	// and is asked before a discovery.
	Store   Store
	Refresh RefreshConfig
	// Observer, when set, is told of every lookup, discovery, refresh and
	// store error, for metrics.
	Observer Observer
	Now      func() time.Time
	Logger   *slog.Logger
}

// RefreshConfig tunes the background refresher (SPEC 6.4, 6.5).
type RefreshConfig struct {
	// Interval is how often the TXT id of a cached domain is re-checked,
	// at most; 0 disables the refresher.
	Interval time.Duration
	// RenewBefore: when the TXT lookup fails, the policy is fetched over
	// HTTPS this long before it expires; 0: min(24h, max_age/2).
	RenewBefore time.Duration
	// Concurrency bounds refreshes running at once; 0: 8.
	Concurrency int
	// IdleAfter: a domain not looked up for this long is dropped; 0: 30
	// days.
	IdleAfter time.Duration
}

// Cache is a concurrency-safe policy cache with on-demand discovery.
type Cache struct {
	src     Source
	entries *lru.Cache[string, *Entry]
	group   singleflight.Group
	cfg     Config
	log     *slog.Logger

	sched *schedule
	// tun holds the settings a reload may change (Retune).
	tun atomic.Pointer[Tunables]

	// base is the parent of every discovery's context; Close cancels it.
	base   context.Context
	cancel context.CancelFunc
	mu     sync.Mutex // guards closed and wg.Add against Close
	closed bool
	wg     sync.WaitGroup

	// storeLocks order the store writes of one domain (storeLock).
	storeLocks    [64]sync.Mutex
	pendingWrites atomic.Int64

	stamps stamp.Table // bumped by every change to entries (set)
}

// New returns a cache that discovers policies from src.
func New(src Source, cfg Config) *Cache {
	if cfg.Size <= 0 {
		cfg.Size = 100000
	}
	if cfg.FirstContactTimeout <= 0 {
		cfg.FirstContactTimeout = 5 * time.Second
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{} // no nil check on the hot path
	}
	if cfg.Refresh.Concurrency <= 0 {
		cfg.Refresh.Concurrency = 8
	}
	if cfg.Refresh.IdleAfter <= 0 {
		cfg.Refresh.IdleAfter = 30 * 24 * time.Hour
	}
	c := &Cache{src: src, cfg: cfg, log: cfg.Logger, sched: newSchedule()}
	c.tun.Store(&Tunables{NegativeTTL: cfg.NegativeTTL, FirstContactTimeout: cfg.FirstContactTimeout,
		FetchTimeout: cfg.FetchTimeout, Refresh: cfg.Refresh})
	entries, err := lru.NewWithEvict(cfg.Size, func(domain string, _ *Entry) {
		// Called for Remove and Purge too, after the entry is gone.
		c.sched.remove(domain)
		c.stamps.Bump(domain)
	})
	if err != nil {
		panic(err) // only for a size <= 0, excluded above
	}
	c.entries = entries
	c.base, c.cancel = context.WithCancel(context.Background())
	if cfg.Refresh.Interval > 0 {
		c.wg.Add(1)
		go c.refreshLoop()
	}
	return c
}

// storeTimeout bounds one store operation made on behalf of a lookup.
const storeTimeout = time.Second

// LoadStore fills the cache from the store at start-up and schedules the
// refresh of every loaded policy at a random time within the first
// interval, so that a restart does not make a burst of queries (SPEC 6.5).
// It may run while the cache serves lookups; a domain already cached is
// left as it is. It returns the number of entries loaded.
func (c *Cache) LoadStore(ctx context.Context) (int, error) {
	if c.cfg.Store == nil {
		return 0, nil
	}
	now := c.cfg.Now()
	n := 0
	err := c.cfg.Store.Load(ctx, now, func(e *Entry) {
		if e.LastUsed.Load() == 0 {
			e.LastUsed.Store(now.Unix())
		}
		// The daemon serves while the store loads: an entry a lookup or
		// a discovery has cached meanwhile is as new as the stored one,
		// or newer, and keeps its place and its refresh.
		if ok, _ := c.entries.ContainsOrAdd(e.Domain, e); ok {
			return
		}
		c.stamps.Bump(e.Domain)
		c.scheduleAt(e, now.Add(randDuration(c.t().Refresh.Interval)))
		n++
	})
	if err != nil {
		c.cfg.Observer.StoreError(StoreOpLoad)
	}
	return n, err
}

// Lookup returns the entry for domain (an A-label, as policymap normalises
// it). It never returns nil. An unexpired cached entry is returned without
// I/O (SPEC 6.1); otherwise a discovery is started or joined, and Lookup
// waits for it until ctx ends or the first-contact timeout passes, whichever
// is first; then it returns an entry with ReasonPending while the discovery
// goes on in the background.
func (c *Cache) Lookup(ctx context.Context, domain string) *Entry {
	if e, ok := c.hit(domain); ok {
		return e
	}
	c.cfg.Observer.CacheMiss()
	return c.await(ctx, domain, c.discoverAsync(domain))
}

// Begin is Lookup in two steps: it counts the hit or miss and starts or
// joins the discovery of an uncached domain, and the function it returns
// finishes the lookup as Lookup would. A caller with other work to do first
// (policymap's DANE check) lets the discovery run meanwhile; one that never
// calls the function leaves the discovery to end on its own.
func (c *Cache) Begin(domain string) func(ctx context.Context) *Entry {
	if e, ok := c.hit(domain); ok {
		return func(context.Context) *Entry { return e }
	}
	c.cfg.Observer.CacheMiss()
	ch := c.discoverAsync(domain)
	return func(ctx context.Context) *Entry { return c.await(ctx, domain, ch) }
}

// hit returns the unexpired cached entry of domain and counts the hit.
func (c *Cache) hit(domain string) (*Entry, bool) {
	// Peek, not Get: Get moves the entry to the front of the LRU list
	// under the cache's write lock, which per lookup cost more than the
	// rest of a cached answer. touch reports when LastUsed moves, once a
	// minute at most, and only then does Get move it: the LRU order is
	// right to the minute (SPEC 6.1: the hot path).
	e, ok := c.entries.Peek(domain)
	if !ok {
		return nil, false
	}
	now := c.cfg.Now()
	if !now.Before(e.Expires) {
		return nil, false
	}
	if e.touch(now) {
		c.entries.Get(domain)
	}
	c.cfg.Observer.CacheHit()
	return e, true
}

// await waits for the discovery delivering on ch until ctx ends or the
// first-contact timeout passes.
func (c *Cache) await(ctx context.Context, domain string, ch <-chan *Entry) *Entry {
	timer := time.NewTimer(c.t().FirstContactTimeout)
	defer timer.Stop()
	select {
	case e := <-ch:
		return e
	case <-timer.C:
	case <-ctx.Done():
	}
	// SPEC 4.6, 6.3: nothing valid is cached and discovery is still
	// running: answer as if the domain had no MTA-STS for now.
	return &Entry{Domain: domain, Reason: ReasonPending, Fetched: c.cfg.Now()}
}

// set caches e in place of its domain's entry. Every change to the
// entries goes through set or the LRU's eviction callback (Remove, Purge,
// eviction), which bump the domain's stamp.
func (c *Cache) set(e *Entry) {
	c.entries.Add(e.Domain, e)
	c.stamps.Bump(e.Domain)
}

// Stamp returns a stamp of domain's entry, to be taken before the entry is
// read (Lookup, Peek): it stays current until that entry is replaced or
// removed. A caller that keeps what it derived from an entry, as
// policymap keeps rendered replies, checks the stamp instead of looking
// the domain up again; it must still heed the entry's Expires and look the
// domain up at least once a minute, for the LRU order and LastUsed.
func (c *Cache) Stamp(domain string) stamp.Stamp { return c.stamps.Take(domain) }

// CountHit counts a cache hit for a lookup answered from something derived
// from a cached entry (see Stamp) rather than by Lookup.
func (c *Cache) CountHit() { c.cfg.Observer.CacheHit() }

// Peek returns the cached entry for domain, expired or not, without
// discovery and without touching its recency.
func (c *Cache) Peek(domain string) (*Entry, bool) {
	return c.entries.Peek(domain)
}

// Len is the number of cached entries, negative ones included.
func (c *Cache) Len() int { return c.entries.Len() }

// Close stops background discoveries and waits for them to end.
func (c *Cache) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}

// discoverAsync starts a discovery of domain, or joins the one running
// (SPEC 4.7: concurrent lookups share one discovery), and delivers its entry
// on the returned channel. The discovery runs on the cache's own context,
// never the lookup's (it must outlive a lookup that stops waiting), bounded
// by the fetch timeout (SPEC 4.6).
func (c *Cache) discoverAsync(domain string) <-chan *Entry {
	out := make(chan *Entry, 1)
	if !c.enter() {
		out <- &Entry{Domain: domain, Reason: ReasonPending, Fetched: c.cfg.Now()}
		return out
	}
	go func() {
		defer c.wg.Done()
		v, _, _ := c.group.Do(domain, func() (any, error) {
			// A discovery of domain that ended after the caller's cache
			// miss but before this one joined it has cached its entry:
			// use it rather than discover again (lookups of one
			// domain a moment apart may come this close).
			if e, ok := c.entries.Peek(domain); ok && c.cfg.Now().Before(e.Expires) {
				return e, nil
			}
			ctx, cancel := context.WithTimeout(c.base, c.t().FetchTimeout)
			defer cancel()
			if e := c.fromStore(ctx, domain); e != nil {
				return e, nil
			}
			e := c.discover(ctx, domain)
			// The lookups waiting get the entry now; the store write
			// follows (persistSoon), off the first-contact path.
			c.cacheEntry(e)
			c.persistSoon(e)
			return e, nil
		})
		out <- v.(*Entry)
	}()
	return out
}

// discover finds the domain's record and fetches its policy (SPEC 3, 4).
func (c *Cache) discover(ctx context.Context, domain string) *Entry {
	now := c.cfg.Now()
	rec, err := c.src.LookupRecord(ctx, domain)
	if err != nil {
		e := &Entry{Domain: domain, Err: bounded(err), Fetched: now}
		switch {
		case errors.Is(err, resolver.ErrNoRecord):
			e.Reason, e.Expires = ReasonNoRecord, now.Add(c.t().NegativeTTL)
		case errors.Is(err, resolver.ErrInvalidRecord):
			e.Reason, e.Expires = ReasonInvalidRecord, now.Add(c.t().NegativeTTL)
		default:
			e.Reason, e.Expires = ReasonDNSFailure, now.Add(min(c.t().NegativeTTL, DNSFailureTTL))
			c.log.Info("MTA-STS record lookup failed", "domain", domain, "err", e.Err)
		}
		c.cfg.Observer.Discovery(string(e.Reason))
		return e
	}
	p, err := c.src.FetchPolicy(ctx, domain)
	if err != nil {
		// SPEC 4.7, 5.5: no fetch of this (domain, id) for FailureBackoff;
		// SPEC 6.3: meanwhile the domain is treated as without MTA-STS.
		e := &Entry{Domain: domain, ID: rec.ID, Reason: ReasonFetchFailed, Err: bounded(err),
			Fetched: now, Expires: now.Add(FailureBackoff)}
		outcome := DiscoveryFetchErrorPrefix + resolver.FetchErrorClass(err)
		if errors.Is(err, resolver.ErrInvalidPolicy) {
			e.Reason, outcome = ReasonInvalidPolicy, string(ReasonInvalidPolicy)
		}
		c.cfg.Observer.Discovery(outcome)
		c.log.Warn("MTA-STS policy fetch failed", "domain", domain, "policy_id", rec.ID, "err", e.Err)
		return e
	}
	now = c.cfg.Now()
	e := &Entry{Domain: domain, ID: rec.ID, Policy: p, Reason: ReasonPolicy, Fetched: now, Expires: now.Add(p.MaxAge)}
	c.log.Info("MTA-STS policy learned", "domain", domain, "policy_id", rec.ID, "mode", string(p.Mode),
		"max_age", p.MaxAge.Seconds(), "mx", mxSummary(p.MX))
	for _, w := range p.Warnings {
		c.log.Info("MTA-STS policy warning", "domain", domain, "policy_id", rec.ID, "warning", w)
	}
	c.cfg.Observer.Discovery(string(ReasonPolicy))
	return e
}

// fromStore returns the stored, unexpired entry of domain (one another MTA
// of a fleet may have learned) and caches it, or nil.
func (c *Cache) fromStore(ctx context.Context, domain string) *Entry {
	if c.cfg.Store == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	e, err := c.cfg.Store.Get(ctx, domain)
	if err != nil {
		c.cfg.Observer.StoreError(StoreOpGet)
		if !errors.Is(err, ErrStoreUnavailable) { // the store logs its own outages
			c.log.Warn("policy store read failed", "domain", domain, "err", bounded(err))
		}
		return nil
	}
	now := c.cfg.Now()
	if e == nil || e.Policy == nil || !now.Before(e.Expires) {
		return nil
	}
	e.touch(now)
	c.set(e)
	c.scheduleAt(e, c.nextCheck(e, now))
	return e
}

// commit caches e unless it expires at once (a zero negative TTL), writes a
// policy through to the store, and schedules its refresh. A changed entry
// replaces the old one in one step: readers see the old or the new.
func (c *Cache) commit(ctx context.Context, e *Entry) {
	if c.cacheEntry(e) && c.cfg.Store != nil {
		c.logStoreError(slog.LevelError, "policy store write failed; the policy is cached in memory only", e.Domain, c.persist(ctx, e))
	}
}

// cacheEntry is commit without the store write: it caches e unless it
// expires at once, schedules the refresh of a policy, and reports whether
// e holds a policy to store.
func (c *Cache) cacheEntry(e *Entry) bool {
	if !e.Expires.After(e.learned()) {
		return false
	}
	if e.LastUsed.Load() == 0 {
		e.LastUsed.Store(c.cfg.Now().Unix())
	}
	c.set(e)
	if e.Policy == nil {
		return false
	}
	c.scheduleAt(e, c.nextCheck(e, c.cfg.Now()))
	return true
}

// persistSoon stores a policy a discovery has just cached, in the
// background: the lookup waiting for it is answered without waiting for
// the store (a bbolt commit costs two fsyncs, several times a whole
// discovery over a fast network). Close waits for the write, so a clean
// shutdown loses nothing (SPEC 8.1); a crash in between loses only that
// policy, which the next lookup discovers again. The caller must hold a
// count of c.wg, as discoverAsync's goroutine does, so that Close cannot
// have returned.
func (c *Cache) persistSoon(e *Entry) {
	if e.Policy == nil || c.cfg.Store == nil {
		return
	}
	c.pendingWrites.Add(1)
	c.wg.Go(func() {
		defer c.pendingWrites.Add(-1)
		c.logStoreError(slog.LevelError, "policy store write failed; the policy is cached in memory only", e.Domain, c.persist(c.base, e))
	})
}

// PendingWrites is the number of learned policies not yet written to the
// store.
func (c *Cache) PendingWrites() int64 { return c.pendingWrites.Load() }

// learned is when the entry was last confirmed: fetched or renewed.
func (e *Entry) learned() time.Time {
	if e.Checked.After(e.Fetched) {
		return e.Checked
	}
	return e.Fetched
}

// touch records a lookup, at most once a minute per entry so that a busy
// domain does not contend on one word; it reports whether it did.
func (e *Entry) touch(now time.Time) bool {
	if t := now.Unix(); t-e.LastUsed.Load() >= 60 {
		e.LastUsed.Store(t)
		return true
	}
	return false
}

// maxErrLen bounds error text kept in entries and logs (SPEC 8.3).
const maxErrLen = 200

func bounded(err error) string {
	s := err.Error()
	if len(s) > maxErrLen {
		s = s[:maxErrLen] + "..."
	}
	return s
}

// mxSummary renders mx patterns for a log line, bounded (SPEC 8.3): a policy
// may list thousands.
func mxSummary(mx []string) string {
	const maxLen = 256
	var b strings.Builder
	for i, m := range mx {
		if b.Len()+len(m) > maxLen {
			b.WriteString(" ...(")
			b.WriteString(strconv.Itoa(len(mx) - i))
			b.WriteString(" more)")
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(m)
	}
	return b.String()
}
