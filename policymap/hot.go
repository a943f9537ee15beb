package policymap

import (
	"sync"
	"time"

	"stsmap/dane"
	"stsmap/internal/stamp"
	"stsmap/policycache"
	"stsmap/socketmap"
)

// The hot table keeps the reply of each key answered from the caches alone,
// under the key as Postfix sent it (issue 7). Answering a cached domain
// otherwise costs three hash-map lookups in three places in memory (the
// DANE result, the policy entry, its rendered answer) plus the key's
// parsing; with thousands of domains and a system call on each side of
// every request, each of those misses the CPU caches. A kept reply costs
// one lookup, and it is checked on every use:
//
//   - stamps of the policy cache and of the DANE checker, taken before the
//     reply was worked out, which any change to the domain's entries turns
//     stale (a refresh, a purge, an eviction, a new DANE result);
//   - a time limit: the policy's expiry, the DANE result's refresh time,
//     and hotTTL, so that the caches are asked at least that often and
//     keep their recency, LastUsed and DANE refreshes as before;
//   - the map name and its settings, which a reload may change.
//
// Only replies worked out from the caches alone are ever used. A first
// contact's reply is kept under the stamps taken before its discovery,
// which the discovery turned stale; a pending answer, an entry the cache
// does not hold, a skipped key (parent domains, IP literals: they cost no
// lookup anyway) and a reply after a DANE check that had to wait are not
// kept at all.
type hotTable struct {
	mu sync.RWMutex
	m  map[string]hotReply
}

// hotReply is one kept reply. It stays under 128 bytes so that the map
// holds it in place rather than behind a pointer.
type hotReply struct {
	name         string // the map name it was answered for
	reply        socketmap.Reply
	until        time.Time
	policy, dane stamp.Stamp
	settings     Settings
	kind         uint8 // index in answerKinds
	hit          bool  // answered from a policy cache hit, counted again on reuse
}

// hotTTL is the longest a reply is kept without asking the caches again.
const hotTTL = 30 * time.Second

// defaultHotSize bounds the kept replies when Handler.HotSize is 0.
const defaultHotSize = 100000

var (
	_ stamper     = (*policycache.Cache)(nil)
	_ daneStamper = (*dane.Checker)(nil)
)

// answerKinds are the Answer* kinds, by hotReply.kind.
var answerKinds = [...]string{AnswerEnforce, AnswerTesting, AnswerNone, AnswerNoPolicy, AnswerDane, AnswerDaneOnly, AnswerTemp}

func kindIndex(kind string) uint8 {
	for i, k := range answerKinds {
		if k == kind {
			return uint8(i)
		}
	}
	panic("policymap: unknown answer kind " + kind)
}

// stamper is implemented by a Lookuper whose entries can be watched, as
// policycache.Cache's can; the hot table is used only with one.
type stamper interface {
	Stamp(domain string) stamp.Stamp
	Peek(domain string) (*policycache.Entry, bool)
	CountHit()
}

// daneStamper is implemented by a DANEChecker whose results can be
// watched, as dane.Checker's can. With DANE on, the hot table is used only
// with one.
type daneStamper interface {
	Stamp(nexthop string) stamp.Stamp
	CachedUntil(nexthop string, port int, host bool) (dane.Level, time.Time, bool, error)
}

// fromHot returns the kept reply for key, if it is still good at now.
func (h *Handler) fromHot(name, key string, now time.Time) (socketmap.Reply, string, bool) {
	h.hot.mu.RLock()
	v, ok := h.hot.m[key]
	h.hot.mu.RUnlock()
	if !ok || v.name != name || !now.Before(v.until) || !v.policy.Current() || !v.dane.Current() || v.settings != h.Settings(name) {
		return socketmap.Reply{}, "", false
	}
	if v.hit {
		h.stamps.CountHit()
	}
	return v.reply, answerKinds[v.kind], true
}

// keep stores a reply for key. When the table is full it first drops the
// replies that can no longer be used, then any, down to 7/8 of its size.
func (h *Handler) keep(key string, v hotReply, now time.Time) {
	if len(v.reply.Data) > maxKeptAnswer {
		return // see maxKeptAnswer
	}
	size := h.HotSize
	if size <= 0 {
		size = defaultHotSize
	}
	h.hot.mu.Lock()
	defer h.hot.mu.Unlock()
	if h.hot.m == nil {
		h.hot.m = make(map[string]hotReply)
	}
	if _, ok := h.hot.m[key]; !ok && len(h.hot.m) >= size {
		for k, old := range h.hot.m {
			if !now.Before(old.until) || !old.policy.Current() || !old.dane.Current() {
				delete(h.hot.m, k)
			}
		}
		for k := range h.hot.m {
			if len(h.hot.m) < size-size/8 {
				break
			}
			delete(h.hot.m, k)
		}
	}
	h.hot.m[key] = v
}
