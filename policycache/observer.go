package policycache

import (
	"time"

	"stsmap/resolver"
)

// Observer is told what the cache does, for metrics. Its methods are called
// from lookups (CacheHit, CacheMiss: the hot path) and from background work,
// concurrently; they must be cheap and must not block. Every argument is
// one of the fixed strings listed below, never text a remote party
// controls.
type Observer interface {
	CacheHit()
	CacheMiss()
	// Discovery reports how a discovery ended: a Reason other than
	// ReasonFetchFailed and ReasonPending ("policy", "no_record",
	// "invalid_record", "dns_failure", "invalid_policy"), or
	// DiscoveryFetchErrorPrefix followed by resolver.FetchErrorClass of
	// the error ("fetch_error_tls", ...).
	Discovery(outcome string)
	// Refresh reports how a refresh of a cached policy ended (the
	// refresher's, or one an operator asked for): one of the Refresh*
	// constants.
	Refresh(outcome string)
	// StoreError reports a failed store operation: one of the StoreOp*
	// constants.
	StoreError(op string)
}

// DiscoveryFetchErrorPrefix starts the Discovery outcome of a failed HTTPS
// fetch; the class of the failure follows.
const DiscoveryFetchErrorPrefix = "fetch_error_"

// Refresh outcomes (SPEC 6.4).
const (
	RefreshRenewed        = "renewed"         // the TXT id is unchanged: the policy's lifetime renewed
	RefreshIDChanged      = "id_changed"      // a new id: its policy fetched and cached
	RefreshRenewedHTTPS   = "renewed_https"   // the TXT lookup failed near expiry: renewed over HTTPS (RFC 8461 §10.2)
	RefreshFailed         = "failed"          // kept the old policy; retried after FailureBackoff
	RefreshBackoff        = "backoff"         // not tried: the last failure is within FailureBackoff
	RefreshKept           = "kept"            // the TXT record is gone or invalid: the policy kept until near expiry
	RefreshAdopted        = "adopted"         // another MTA of the fleet refreshed it: its result taken from the store
	RefreshNotClaimed     = "not_claimed"     // another MTA of the fleet refreshes it, with no newer result yet
	RefreshDroppedIdle    = "dropped_idle"    // not looked up for refresh.idle_after: dropped
	RefreshDroppedExpired = "dropped_expired" // expired before a refresh succeeded: dropped
)

// Store operations, for Observer.StoreError.
const (
	StoreOpLoad   = "load"
	StoreOpGet    = "get"
	StoreOpPut    = "put"
	StoreOpDelete = "delete"
	StoreOpClaim  = "claim"
)

// nopObserver stands in for a nil Config.Observer.
type nopObserver struct{}

func (nopObserver) CacheHit()         {}
func (nopObserver) CacheMiss()        {}
func (nopObserver) Discovery(string)  {}
func (nopObserver) Refresh(string)    {}
func (nopObserver) StoreError(string) {}

var _ Observer = nopObserver{}

// FailingRefreshAlarm is how long a policy's refreshes must have failed for
// Stats to count it in RefreshFailingOverADay: RFC 8461 §10.2 asks to alert
// when a policy cannot be refreshed for a long time, as an attacker may be
// blocking the refresh until the policy expires.
const FailingRefreshAlarm = 24 * time.Hour

// Stats is a summary of the cache's entries, for metrics.
type Stats struct {
	// Entries counts every cached entry, expired ones included.
	Entries int
	// ByMode counts the unexpired policies by mode ("enforce", "testing",
	// "none").
	ByMode map[string]int
	// Negative counts the unexpired entries without a policy.
	Negative int
	// RefreshFailingOverADay counts the unexpired policies, other than
	// mode none, whose refreshes have failed for longer than
	// FailingRefreshAlarm.
	RefreshFailingOverADay int
}

// Stats summarises the cache. It visits every entry, without touching
// their recency: call it at a metrics scrape, not per lookup.
func (c *Cache) Stats() Stats {
	now := c.cfg.Now()
	s := Stats{ByMode: map[string]int{}}
	for _, e := range c.entries.Values() {
		s.Entries++
		if !now.Before(e.Expires) {
			continue
		}
		if e.Policy == nil {
			s.Negative++
			continue
		}
		s.ByMode[string(e.Policy.Mode)]++
		// A failing refresh of mode none is no alarm: a domain that
		// withdraws MTA-STS publishes none, then takes its policy host
		// down (RFC 8461 §8.3); failures of none are not warned of either
		// (SPEC 6.4).
		if e.Policy.Mode != resolver.ModeNone && !e.FailedAt.IsZero() && !e.FailingSince.IsZero() &&
			now.Sub(e.FailingSince) > FailingRefreshAlarm {
			s.RefreshFailingOverADay++
		}
	}
	return s
}
