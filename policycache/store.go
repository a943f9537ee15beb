package policycache

import (
	"context"
	"errors"
	"time"
)

// Store keeps policies beyond the process: an embedded file (package
// policystore's Bolt) so that a restart loses none, or a shared server
// (policystore's Redis) so that a fleet of MTAs shares what any of them
// learned. The cache writes every change through; only entries with a
// policy are stored.
type Store interface {
	// Load calls fn for every stored entry that is unexpired at now,
	// pruning expired ones. It is called once, at start-up.
	Load(ctx context.Context, now time.Time, fn func(*Entry)) error
	// Get returns the stored entry of domain, or nil and no error when
	// there is none.
	Get(ctx context.Context, domain string) (*Entry, error)
	// Put stores e (which has a policy), replacing the domain's entry.
	Put(ctx context.Context, e *Entry) error
	// Delete removes the domain's entry; a missing one is no error.
	Delete(ctx context.Context, domain string) error
	// Claim reports whether this process should refresh domain now. A
	// shared store grants a domain to one process per period (SPEC 6.5:
	// one refresh per domain per interval per fleet); a local store
	// always grants it.
	Claim(ctx context.Context, domain string, period time.Duration) (bool, error)
	Close() error
}

// ErrStoreUnavailable is returned by a Store that cannot be reached at the
// moment (a shared store whose server is down). The cache carries on from
// memory and live discovery.
var ErrStoreUnavailable = errors.New("policycache: store unavailable")
