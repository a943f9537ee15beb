// Package stamp tells a reader whether something it derived from a cache
// entry is still current, without looking the entry up again.
//
// A cache keeps a Table beside its entries and calls Bump after every
// change to a key's entry (added, replaced, removed or evicted). A reader
// takes a Stamp of the key before it reads the entry; what it derives from
// that read is current for as long as the Stamp is. A Stamp may also turn
// stale through a change to another key that shares its counter: that
// costs the reader one more lookup, never a wrong answer.
package stamp

import (
	"hash/maphash"
	"sync/atomic"
)

// shards is the number of counters in a Table (64 KiB of them). With the
// default cache of 100,000 entries about 100 keys share one.
const shards = 8192

// Table holds the change counters of one cache. Its zero value is ready.
type Table struct {
	counters [shards]atomic.Uint64
}

var seed = maphash.MakeSeed()

func (t *Table) counter(key string) *atomic.Uint64 {
	return &t.counters[maphash.String(seed, key)%shards]
}

// Bump records a change to key's entry. Call it after the change is made.
func (t *Table) Bump(key string) { t.counter(key).Add(1) }

// Take returns a Stamp of key. Take it before reading key's entry.
func (t *Table) Take(key string) Stamp {
	c := t.counter(key)
	return Stamp{c: c, v: c.Load()}
}

// Stamp is what key's counter read when it was taken. The zero Stamp
// stands for nothing to watch: it is always current.
type Stamp struct {
	c *atomic.Uint64
	v uint64
}

// Current reports whether no change has been recorded since s was taken.
func (s Stamp) Current() bool { return s.c == nil || s.c.Load() == s.v }
