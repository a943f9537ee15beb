package policycache

import (
	"context"
	"errors"
	"log/slog"
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

// storeDelete removes domain from the store, like storePut.
func (c *Cache) storeDelete(ctx context.Context, domain string) error {
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
