package policycache

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// The operations below serve `stsmap cache ...`: an operator lists, purges
// and re-checks the policies of the running daemon. Purge is the remedy for
// a domain that changed its policy without changing its TXT id, which RFC
// 8461 §3.1 asks it to do: the refresher sees the unchanged id and keeps
// renewing the old policy (SPEC 6.4).

// ErrClosed is returned by the admin operations of a closed cache.
var ErrClosed = errors.New("policycache: cache closed")

// purgeAllStoreTimeout bounds PurgeAll's walk of the store: one read of
// every stored policy and one delete per domain.
const purgeAllStoreTimeout = 2 * time.Minute

// List returns every cached entry, sorted by domain, expired and negative
// ones included, without touching their recency.
func (c *Cache) List() []*Entry {
	list := c.entries.Values()
	slices.SortFunc(list, func(a, b *Entry) int { return strings.Compare(a.Domain, b.Domain) })
	return list
}

// Purge removes domain from memory and from the store, so that the next
// lookup discovers its policy afresh. It reports whether domain was cached
// in memory. A discovery or refresh of domain already running is waited for
// and then purged too, so that it cannot put the old policy back; lookups of
// domain while the purge runs answer as a pending discovery does.
//
// An error means the store still holds domain's policy, which a restart or,
// with a shared store, the next lookup may bring back; memory is purged all
// the same.
func (c *Cache) Purge(ctx context.Context, domain string) (bool, error) {
	if !c.enter() {
		return false, ErrClosed
	}
	defer c.wg.Done()
	for {
		var ran, cached bool
		var err error
		// Holding domain's singleflight key keeps discoveries and refreshes
		// of it from starting until the purge is done; they join it and get
		// the pending entry.
		c.group.Do(domain, func() (any, error) {
			ran = true
			cached = c.entries.Remove(domain)
			err = c.deleteStored(ctx, domain)
			return c.pendingEntry(domain), nil
		})
		if ran {
			return cached, err
		}
		// Joined a discovery or refresh of domain: purge what it cached.
		if err := ctx.Err(); err != nil {
			return false, err
		}
	}
}

// PurgeAll removes every entry from memory and every policy from the store
// (with a shared store: the policies every MTA of the fleet learned). It
// returns the number of domains removed. Unlike Purge it does not wait for
// discoveries and refreshes running meanwhile, which may cache their result
// after it.
func (c *Cache) PurgeAll(ctx context.Context) (int, error) {
	if !c.enter() {
		return 0, ErrClosed
	}
	defer c.wg.Done()
	purged := map[string]struct{}{}
	for _, domain := range c.entries.Keys() {
		if c.entries.Remove(domain) {
			purged[domain] = struct{}{}
		}
	}
	if c.cfg.Store == nil {
		return len(purged), nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), purgeAllStoreTimeout)
	defer cancel()
	var stored []string
	err := c.cfg.Store.Load(ctx, c.cfg.Now(), func(e *Entry) { stored = append(stored, e.Domain) })
	if err != nil {
		return len(purged), fmt.Errorf("policy store: listing the stored policies: %w", err)
	}
	failed := 0
	var firstErr error
	for _, domain := range stored {
		if err := c.cfg.Store.Delete(ctx, domain); err != nil {
			if failed++; firstErr == nil {
				firstErr = err
			}
			continue
		}
		purged[domain] = struct{}{}
	}
	if firstErr != nil {
		return len(purged), fmt.Errorf("policy store: %d of %d stored policies not deleted: %w", failed, len(stored), firstErr)
	}
	return len(purged), nil
}

// RefreshNow re-checks domain at once and returns the entry in force
// afterwards. A cached policy is refreshed as the refresher would at its
// next turn (SPEC 6.4: its TXT id re-checked, the policy fetched only when
// the id changed), but even within the failure back-off: an operator asking
// once is not the retry storm SPEC 4.7 prevents. For a domain with no
// unexpired policy in memory or in the store, a discovery runs.
//
// Either waits up to the fetch timeout and runs on the cache's context, not
// ctx: lookups of domain join it (SPEC 4.7), and an operator giving up must
// not leave them a failed fetch to cache. It always starts after the call:
// a discovery or refresh of domain already running is waited for, then
// domain is re-checked all the same.
func (c *Cache) RefreshNow(ctx context.Context, domain string) (*Entry, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if !c.enter() {
		return nil, ErrClosed
	}
	defer c.wg.Done()
	for {
		var ran bool
		v, _, _ := c.group.Do(domain, func() (any, error) {
			ran = true
			wctx, cancel := context.WithTimeout(c.base, c.cfg.FetchTimeout)
			defer cancel()
			return c.recheck(wctx, domain), nil
		})
		if ran {
			return v.(*Entry), nil
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
}

// recheck refreshes domain's policy, or discovers it when none is cached.
func (c *Cache) recheck(ctx context.Context, domain string) *Entry {
	now := c.cfg.Now()
	e, ok := c.entries.Peek(domain)
	if !ok || e.Policy == nil || !now.Before(e.Expires) {
		e = c.fromStore(ctx, domain)
	}
	if e == nil || e.Policy == nil {
		e = c.discover(ctx, domain)
		c.commit(ctx, e)
		return e
	}
	old := e.clone()
	old.FailedID, old.FailedAt = "", time.Time{} // no back-off
	n := c.refresh(ctx, old, now)
	// When the refresh keeps the old policy (the TXT record is gone, far
	// from expiry) it caches nothing; the entry in force is then e, with
	// its failure state, not the back-off-free copy.
	if cur, ok := c.entries.Peek(domain); ok {
		return cur
	}
	return n
}

// deleteStored deletes domain from the store, if there is one. The delete
// is not cancelled with ctx: an operator giving up half-way must not leave
// the store holding what memory no longer does.
func (c *Cache) deleteStored(ctx context.Context, domain string) error {
	if c.cfg.Store == nil {
		return nil
	}
	if err := c.storeDelete(ctx, domain); err != nil {
		return fmt.Errorf("policy store: %w", err)
	}
	return nil
}

// enter registers a discovery or an admin operation with Close, so that
// Close waits for it and the store outlives it. It reports false once the
// cache is closed.
func (c *Cache) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Add(1)
	return true
}

// pendingEntry is the answer for a domain whose discovery has not ended:
// no policy for now (SPEC 4.6, 6.3).
func (c *Cache) pendingEntry(domain string) *Entry {
	return &Entry{Domain: domain, Reason: ReasonPending, Fetched: c.cfg.Now()}
}
