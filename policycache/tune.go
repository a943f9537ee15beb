package policycache

import "time"

// Tunables are the settings a configuration reload may change while the
// cache runs; the others (size, store, clock) are fixed at New.
type Tunables struct {
	NegativeTTL         time.Duration
	FirstContactTimeout time.Duration
	FetchTimeout        time.Duration
	// Refresh changes apply to the next scheduling of each domain; the
	// refresher cannot be switched on or off (Interval 0) by a reload.
	Refresh RefreshConfig
}

// t returns the settings in force.
func (c *Cache) t() *Tunables { return c.tun.Load() }

// Retune puts new settings in force for the lookups, discoveries and
// refreshes that start from now on; those running finish on the old ones.
// Zero values keep the current ones.
func (c *Cache) Retune(n Tunables) {
	old := c.t()
	if n.FirstContactTimeout <= 0 {
		n.FirstContactTimeout = old.FirstContactTimeout
	}
	if n.FetchTimeout <= 0 {
		n.FetchTimeout = old.FetchTimeout
	}
	if n.Refresh.Interval <= 0 || old.Refresh.Interval <= 0 {
		n.Refresh.Interval = old.Refresh.Interval
	}
	if n.Refresh.Concurrency <= 0 {
		n.Refresh.Concurrency = old.Refresh.Concurrency
	}
	if n.Refresh.IdleAfter <= 0 {
		n.Refresh.IdleAfter = old.Refresh.IdleAfter
	}
	c.tun.Store(&n)
	c.sched.poke() // the refresher picks up a new concurrency
}
