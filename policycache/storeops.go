package policycache

import (
	"context"
	"errors"
	"hash/fnv"
	"log/slog"
	"sync"
)

// storePut writes e through to the store. The write is bounded by
// storeTimeout but not cancelled with ctx: a change the cache made must
// reach the store even if whoever asked for it has gone. Failures are
// counted; the caller says whether they are worth a log line.
func (c *Cache) storePut(ctx context.Context, e *Entry) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer cancel()
	err := c.cfg.Store.Put(ctx, e)
	if err != nil {
		c.cfg.Observer.StoreError(StoreOpPut)
	}
	return err
}

// persist writes e through to the store if it is still the domain's
// cached entry. Writes of one domain may race (a discovery's write in the
// background, a refresh, a purge); under the domain's store lock the last
// writer stores what is cached then, and an entry that was replaced or
// removed meanwhile is left to whoever replaced or removed it.
func (c *Cache) persist(ctx context.Context, e *Entry) error {
	mu := c.storeLock(e.Domain)
	mu.Lock()
	defer mu.Unlock()
	if cur, ok := c.entries.Peek(e.Domain); !ok || cur != e {
		return nil
	}
	if err := c.storePut(ctx, e); err != nil {
		return err
	}
	c.log.Debug("policy stored", "domain", e.Domain, "policy_id", e.ID)
	return nil
}

// storeLock is the lock that orders the store writes of domain; domains
// share a few locks by hash.
func (c *Cache) storeLock(domain string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(domain))
	return &c.storeLocks[h.Sum32()%uint32(len(c.storeLocks))]
}

// storeDelete removes domain from the store, like storePut, under the
// domain's store lock (see persist).
func (c *Cache) storeDelete(ctx context.Context, domain string) error {
	mu := c.storeLock(domain)
	mu.Lock()
	defer mu.Unlock()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer cancel()
	err := c.cfg.Store.Delete(ctx, domain)
	if err != nil {
		c.cfg.Observer.StoreError(StoreOpDelete)
	}
	return err
}

// logStoreError logs a store failure, except an outage of a shared store,
// which the store logs once itself.
func (c *Cache) logStoreError(level slog.Level, msg, domain string, err error) {
	if err != nil && !errors.Is(err, ErrStoreUnavailable) {
		c.log.Log(context.Background(), level, msg, "domain", domain, "err", bounded(err))
	}
}
