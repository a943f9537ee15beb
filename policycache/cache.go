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
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/singleflight"

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
}

// Config tunes a Cache; zero values take the defaults noted.
type Config struct {
	Size                int           // 0: 100000
	NegativeTTL         time.Duration // 0: no negative caching
	FirstContactTimeout time.Duration // 0: 5s
	FetchTimeout        time.Duration // 0: 30s
	Now                 func() time.Time
	Logger              *slog.Logger
}

// Cache is a concurrency-safe policy cache with on-demand discovery.
type Cache struct {
	src     Source
	entries *lru.Cache[string, *Entry]
	group   singleflight.Group
	cfg     Config
	log     *slog.Logger

	// base is the parent of every discovery's context; Close cancels it.
	base   context.Context
	cancel context.CancelFunc
	mu     sync.Mutex // guards closed and wg.Add against Close
	closed bool
	wg     sync.WaitGroup
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
	entries, err := lru.New[string, *Entry](cfg.Size)
	if err != nil {
		panic(err) // only for a size <= 0, excluded above
	}
	base, cancel := context.WithCancel(context.Background())
	return &Cache{src: src, entries: entries, cfg: cfg, log: cfg.Logger, base: base, cancel: cancel}
}

// Lookup returns the entry for domain (an A-label, as policymap normalises
// it). It never returns nil. An unexpired cached entry is returned without
// I/O (SPEC 6.1); otherwise a discovery is started or joined, and Lookup
// waits for it until ctx ends or the first-contact timeout passes, whichever
// is first; then it returns an entry with ReasonPending while the discovery
// goes on in the background.
func (c *Cache) Lookup(ctx context.Context, domain string) *Entry {
	if e, ok := c.entries.Get(domain); ok && c.cfg.Now().Before(e.Expires) {
		return e
	}
	ch := c.discoverAsync(domain)
	timer := time.NewTimer(c.cfg.FirstContactTimeout)
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
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		out <- &Entry{Domain: domain, Reason: ReasonPending, Fetched: c.cfg.Now()}
		return out
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		v, _, _ := c.group.Do(domain, func() (any, error) {
			ctx, cancel := context.WithTimeout(c.base, c.cfg.FetchTimeout)
			defer cancel()
			e := c.discover(ctx, domain)
			c.store(e)
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
			e.Reason, e.Expires = ReasonNoRecord, now.Add(c.cfg.NegativeTTL)
		case errors.Is(err, resolver.ErrInvalidRecord):
			e.Reason, e.Expires = ReasonInvalidRecord, now.Add(c.cfg.NegativeTTL)
		default:
			e.Reason, e.Expires = ReasonDNSFailure, now.Add(min(c.cfg.NegativeTTL, DNSFailureTTL))
			c.log.Info("MTA-STS record lookup failed", "domain", domain, "err", e.Err)
		}
		return e
	}
	p, err := c.src.FetchPolicy(ctx, domain)
	if err != nil {
		// SPEC 4.7, 5.5: no fetch of this (domain, id) for FailureBackoff;
		// SPEC 6.3: meanwhile the domain is treated as without MTA-STS.
		e := &Entry{Domain: domain, ID: rec.ID, Reason: ReasonFetchFailed, Err: bounded(err),
			Fetched: now, Expires: now.Add(FailureBackoff)}
		if errors.Is(err, resolver.ErrInvalidPolicy) {
			e.Reason = ReasonInvalidPolicy
		}
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
	return e
}

// store keeps e unless it expires at once (a zero negative TTL).
func (c *Cache) store(e *Entry) {
	if e.Expires.After(e.Fetched) {
		c.entries.Add(e.Domain, e)
	}
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
