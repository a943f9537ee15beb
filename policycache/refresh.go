package policycache

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"time"

	"stsmap/resolver"
)

// The refresher (SPEC 6.4, 6.5, RFC 8461 §10.2): every cached policy is
// re-checked once per interval, at a time of its own (jittered), by at most
// Refresh.Concurrency workers. An unchanged TXT id renews the policy without
// an HTTPS fetch; a changed id fetches the new policy; a failed TXT lookup
// near expiry fetches the policy directly, so that blocking DNS cannot make
// a policy lapse. A failed refresh keeps the old policy until it expires.

// refreshLoop runs refreshes as they fall due, until Close.
func (c *Cache) refreshLoop() {
	defer c.wg.Done()
	sem := make(chan struct{}, c.t().Refresh.Concurrency)
	var workers sync.WaitGroup
	defer workers.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if n := c.t().Refresh.Concurrency; n != cap(sem) {
			sem = make(chan struct{}, n) // a reload changed it
		}
		now := c.cfg.Now()
		for {
			domain, ok := c.sched.popDue(now)
			if !ok {
				break
			}
			token := sem
			select {
			case token <- struct{}{}:
			case <-c.base.Done():
				return
			}
			workers.Go(func() {
				defer func() { <-token }()
				c.refreshDomain(domain)
			})
		}
		wait := time.Hour
		if next, ok := c.sched.next(); ok {
			wait = max(next.Sub(c.cfg.Now()), 0)
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-c.sched.wake:
		case <-c.base.Done():
			return
		}
	}
}

// refreshDomain refreshes one cached domain; a panic is logged, not fatal.
func (c *Cache) refreshDomain(domain string) {
	defer func() {
		if v := recover(); v != nil {
			c.log.Error("refresh panicked", "domain", domain, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
		}
	}()
	e, ok := c.entries.Peek(domain)
	if !ok || e.Policy == nil {
		return
	}
	now := c.cfg.Now()
	if now.Unix()-e.LastUsed.Load() > int64(c.t().Refresh.IdleAfter/time.Second) {
		c.drop(e, "idle")
		c.cfg.Observer.Refresh(RefreshDroppedIdle)
		return
	}
	if !now.Before(e.Expires) {
		c.drop(e, "expired")
		c.cfg.Observer.Refresh(RefreshDroppedExpired)
		return
	}
	ctx, cancel := context.WithTimeout(c.base, c.t().FetchTimeout)
	defer cancel()
	if c.cfg.Store != nil {
		// A fleet refreshes each domain once per interval: the MTA that
		// claims it does the work, the others take its result.
		claimed, err := c.cfg.Store.Claim(ctx, domain, c.t().Refresh.Interval)
		if err != nil {
			c.cfg.Observer.StoreError(StoreOpClaim)
		}
		if err == nil && !claimed {
			c.adoptFromStore(ctx, e, now)
			return
		}
	}
	// Lookups that miss meanwhile join this refresh instead of starting a
	// discovery of their own (SPEC 4.7).
	c.group.Do(domain, func() (any, error) {
		n := c.refresh(ctx, e, now)
		return n, nil
	})
}

// adoptFromStore takes the entry another MTA refreshed, when it is newer.
func (c *Cache) adoptFromStore(ctx context.Context, old *Entry, now time.Time) {
	s, err := c.cfg.Store.Get(ctx, old.Domain)
	if err != nil {
		c.cfg.Observer.StoreError(StoreOpGet)
	}
	if err == nil && s != nil && s.Policy != nil && now.Before(s.Expires) && s.learned().After(old.learned()) {
		s.LastUsed.Store(max(s.LastUsed.Load(), old.LastUsed.Load()))
		if cur, ok := c.entries.Peek(old.Domain); ok && cur == old {
			c.set(s)
		}
		c.scheduleAt(s, c.nextCheck(s, now))
		c.cfg.Observer.Refresh(RefreshAdopted)
		return
	}
	c.scheduleAt(old, c.nextCheck(old, now))
	c.cfg.Observer.Refresh(RefreshNotClaimed)
}

// refresh re-checks the TXT id of a cached policy (SPEC 6.4) and returns the
// entry now in force.
func (c *Cache) refresh(ctx context.Context, old *Entry, now time.Time) *Entry {
	domain := old.Domain
	rec, err := c.src.LookupRecord(ctx, domain)
	switch {
	case err == nil && rec.ID == old.ID:
		// Unchanged id: renew without a fetch.
		n := old.clone()
		n.Checked, n.Expires = now, now.Add(old.Policy.MaxAge)
		n.FailedID, n.FailedAt, n.FailingSince = "", time.Time{}, time.Time{}
		c.commit(ctx, n)
		c.cfg.Observer.Refresh(RefreshRenewed)
		return n

	case err == nil:
		// A new id: fetch the new policy, unless that (domain, id) failed
		// within the back-off (SPEC 4.7).
		if c.backedOff(old, rec.ID, now) {
			return old
		}
		p, ferr := c.src.FetchPolicy(ctx, domain)
		if ferr != nil {
			return c.refreshFailed(ctx, old, rec.ID, now, "policy fetch for a new id failed", ferr)
		}
		n := c.fetched(old, rec.ID, p)
		c.log.Info("MTA-STS policy changed", "domain", domain, "old_policy_id", old.ID, "policy_id", rec.ID,
			"mode", string(p.Mode), "max_age", p.MaxAge.Seconds(), "mx", mxSummary(p.MX))
		c.commit(ctx, n)
		c.cfg.Observer.Refresh(RefreshIDChanged)
		return n
	}

	// The TXT lookup failed or the record vanished: neither removes the
	// cached policy (SPEC 3.4). Near expiry, fetch the policy directly
	// (RFC 8461 §10.2).
	if old.Expires.Sub(now) > c.renewBefore(old.Policy) {
		if errors.Is(err, resolver.ErrDNS) {
			return c.refreshFailed(ctx, old, "", now, "MTA-STS record lookup failed; keeping the cached policy", err)
		}
		c.log.Info("MTA-STS record gone or invalid; keeping the cached policy until it nears expiry",
			"domain", domain, "policy_id", old.ID, "err", bounded(err))
		c.scheduleAt(old, c.nextCheck(old, now))
		c.cfg.Observer.Refresh(RefreshKept)
		return old
	}
	// A failed TXT lookup (FailedID "") is no failed fetch and delays
	// nothing.
	if c.backedOff(old, old.ID, now) {
		return old
	}
	p, ferr := c.src.FetchPolicy(ctx, domain)
	if ferr != nil {
		return c.refreshFailed(ctx, old, old.ID, now, "policy renewal over HTTPS failed after the TXT lookup failed", ferr)
	}
	n := c.fetched(old, old.ID, p)
	c.log.Info("MTA-STS policy renewed over HTTPS without its TXT record", "domain", domain, "policy_id", old.ID,
		"mode", string(p.Mode), "txt_err", bounded(err))
	c.commit(ctx, n)
	c.cfg.Observer.Refresh(RefreshRenewedHTTPS)
	return n
}

// backedOff reports whether a fetch of the policy of id failed within the
// back-off (SPEC 4.7: not fetched again for FailureBackoff), and if so
// schedules old's refresh for when it ends.
func (c *Cache) backedOff(old *Entry, id string, now time.Time) bool {
	if old.FailedID != id || now.Sub(old.FailedAt) >= FailureBackoff {
		return false
	}
	c.scheduleAt(old, old.FailedAt.Add(FailureBackoff))
	c.cfg.Observer.Refresh(RefreshBackoff)
	return true
}

// fetched is the entry of policy p of id, just fetched by a refresh of
// old: a new lifetime from now (SPEC 6.2), old's last use kept.
func (c *Cache) fetched(old *Entry, id string, p *resolver.Policy) *Entry {
	now := c.cfg.Now()
	n := &Entry{Domain: old.Domain, ID: id, Policy: p, Reason: ReasonPolicy, Fetched: now, Checked: now, Expires: now.Add(p.MaxAge)}
	n.LastUsed.Store(old.LastUsed.Load())
	return n
}

// refreshFailed keeps the old policy, records the failure and retries after
// the back-off (SPEC 4.7, 6.4). It warns unless the mode is none (§3.3).
func (c *Cache) refreshFailed(ctx context.Context, old *Entry, failedID string, now time.Time, msg string, err error) *Entry {
	n := old.clone()
	n.FailedID, n.FailedAt = failedID, now
	if n.FailingSince.IsZero() {
		// The first failure since the last success; a record stored
		// before FailingSince existed knows only its last failure.
		n.FailingSince = now
		if !old.FailedAt.IsZero() {
			n.FailingSince = old.FailedAt
		}
	}
	if old.Policy.Mode != resolver.ModeNone {
		c.log.Warn(msg, "domain", old.Domain, "policy_id", old.ID, "new_policy_id", failedID,
			"mode", string(old.Policy.Mode), "expires", old.Expires.UTC().Format(time.RFC3339), "err", bounded(err))
	}
	c.set(n)
	if c.cfg.Store != nil {
		c.persist(ctx, n) // the failure state is advisory: counted, not logged
	}
	next := now.Add(FailureBackoff + randDuration(FailureBackoff/10))
	if failedID == "" {
		// Only the TXT lookup failed: no fetch failed, so no back-off
		// holds the renewal over HTTPS, which must come before the
		// policy expires (SPEC 6.4, RFC 8461 §10.2) even when that is
		// sooner than the back-off.
		if renew := n.Expires.Add(-c.renewBefore(n.Policy)); renew.Before(next) {
			next = laterOf(renew, now.Add(c.minRecheck(n.Policy)))
		}
	}
	c.scheduleAt(n, next)
	c.cfg.Observer.Refresh(RefreshFailed)
	return n
}

// drop removes a domain that is idle or whose policy expired, from memory
// and the store.
func (c *Cache) drop(e *Entry, why string) {
	c.entries.Remove(e.Domain)
	c.log.Debug("dropping cached policy", "domain", e.Domain, "policy_id", e.ID, "why", why)
	if c.cfg.Store != nil {
		c.logStoreError(slog.LevelWarn, "policy store delete failed", e.Domain, c.storeDelete(c.base, e.Domain))
	}
}

// renewBefore is how long before expiry a policy whose TXT lookup fails is
// fetched directly: the configured value, or min(24h, max_age/2).
func (c *Cache) renewBefore(p *resolver.Policy) time.Duration {
	if c.t().Refresh.RenewBefore > 0 {
		return c.t().Refresh.RenewBefore
	}
	return min(24*time.Hour, p.MaxAge/2)
}

// nextCheck is when e is due for its next refresh: one interval after now,
// plus up to a tenth of it as jitter, but early enough to renew before
// expiry when the policy's max_age is shorter than the interval.
func (c *Cache) nextCheck(e *Entry, now time.Time) time.Time {
	next := now.Add(c.t().Refresh.Interval + randDuration(c.t().Refresh.Interval/10))
	if renew := e.Expires.Add(-c.renewBefore(e.Policy)); renew.Before(next) {
		next = laterOf(renew, now.Add(c.minRecheck(e.Policy)))
	}
	return next
}

func laterOf(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// minRecheck is the least time between two refreshes of a policy near
// expiry: a minute, or a quarter of a shorter max_age (at least a second),
// so that even a policy of a few minutes is renewed before it expires.
func (c *Cache) minRecheck(p *resolver.Policy) time.Duration {
	return min(time.Minute, max(p.MaxAge/4, time.Second))
}

func (c *Cache) scheduleAt(e *Entry, at time.Time) {
	if c.t().Refresh.Interval > 0 && e.Policy != nil {
		c.sched.set(e.Domain, at)
	}
}

func randDuration(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

// schedule holds when each cached domain is next due for refresh: a
// min-heap of times, with stale items (rescheduled or removed domains)
// skipped when they surface.
type schedule struct {
	mu   sync.Mutex
	due  map[string]time.Time
	heap dueHeap
	wake chan struct{} // signalled when an earlier time is set
}

func newSchedule() *schedule {
	return &schedule{due: map[string]time.Time{}, wake: make(chan struct{}, 1)}
}

func (s *schedule) set(domain string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.due[domain] = at
	heap.Push(&s.heap, dueItem{at, domain})
	if s.heap[0].domain == domain && s.heap[0].at.Equal(at) {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// poke wakes the refresher.
func (s *schedule) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *schedule) remove(domain string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.due, domain)
}

// popDue returns a domain due at now, removing it from the schedule.
func (s *schedule) popDue(now time.Time) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.heap) > 0 {
		top := s.heap[0]
		if at, ok := s.due[top.domain]; !ok || !at.Equal(top.at) {
			heap.Pop(&s.heap) // stale
			continue
		}
		if top.at.After(now) {
			return "", false
		}
		heap.Pop(&s.heap)
		delete(s.due, top.domain)
		return top.domain, true
	}
	return "", false
}

// next returns the earliest due time.
func (s *schedule) next() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.heap) > 0 {
		top := s.heap[0]
		if at, ok := s.due[top.domain]; ok && at.Equal(top.at) {
			return top.at, true
		}
		heap.Pop(&s.heap)
	}
	return time.Time{}, false
}

type dueItem struct {
	at     time.Time
	domain string
}

type dueHeap []dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(dueItem)) }
func (h *dueHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
