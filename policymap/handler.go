package policymap

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"stsmap/dane"
	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// Lookuper is what the handler needs from the policy cache.
type Lookuper interface {
	Lookup(ctx context.Context, domain string) *policycache.Entry
}

var _ Lookuper = (*policycache.Cache)(nil)

// DANEChecker is what the handler needs from package dane.
type DANEChecker interface {
	Check(ctx context.Context, nexthop string, port int, host bool) (dane.Level, error)
}

var _ DANEChecker = (*dane.Checker)(nil)

// daneCache is implemented by a DANEChecker that can answer from its cache
// without waiting, as dane.Checker does: a cached level then costs no
// deadline (a context and a timer) per lookup.
type daneCache interface {
	Cached(nexthop string, port int, host bool) (dane.Level, bool, error)
}

var _ daneCache = (*dane.Checker)(nil)

// Handler answers Postfix's smtp_tls_policy_maps lookups (SPEC 2, 7).
type Handler struct {
	Cache Lookuper
	// Settings returns the settings of a socketmap map name (the last
	// field of socketmap:inet:HOST:PORT:NAME).
	Settings func(mapName string) Settings
	// DANE, when set, gives DANE levels precedence over MTA-STS (SPEC
	// 7.5); a check is waited for at most DANETimeout (0: 5s).
	DANE        DANEChecker
	DANETimeout time.Duration
	Logger      *slog.Logger
	// Observe, when set, is called once per lookup with what Postfix was
	// answered (one of the Answer* constants) and how long it took, for
	// metrics. It must not block.
	Observe func(answer string, elapsed time.Duration)
	// HotSize bounds the replies kept ready for cached domains (see
	// hotTable; 0: 100000). The table is used when Cache is a
	// *policycache.Cache and DANE is nil or a *dane.Checker.
	HotSize int
	// Now is the clock of Cache and DANE (nil: time.Now).
	Now func() time.Time

	once       sync.Once
	stamps     stamper     // Cache, when the hot table is in use
	daneStamps daneStamper // DANE, when the hot table is in use and DANE is on
	hot        hotTable
}

// maxKeptAnswer is the longest answer kept ready (hotTable). A policy of
// 64 KiB renders an answer near Postfix's 100000-byte limit; keeping such
// answers would double what a remote party can make every cached domain
// hold. Real answers are a few hundred bytes.
const maxKeptAnswer = 4096

// What a lookup was answered, for Handler.Observe.
const (
	AnswerEnforce  = "enforce"   // secure, from a policy in mode enforce
	AnswerTesting  = "testing"   // secure, from a policy in mode testing (strict testing)
	AnswerNone     = "none"      // NOTFOUND, from a policy in mode none
	AnswerNoPolicy = "no_policy" // NOTFOUND for any other reason: no policy, testing, a skipped key
	AnswerDane     = "dane"      // the DANE level dane (SPEC 7.5)
	AnswerDaneOnly = "dane-only" // the DANE level dane-only
	AnswerTemp     = "temp"      // TEMP: the DANE TLSA lookup failed
)

var _ socketmap.Handler = (*Handler)(nil)

// ServeSocketmap implements socketmap.Handler. It never answers TEMP for a
// remote domain's fault (SPEC 1.3): whatever discovery finds, the answer is
// a policy or NOTFOUND.
func (h *Handler) ServeSocketmap(ctx context.Context, name, key string) socketmap.Reply {
	h.once.Do(h.init)
	now := h.now()
	r, answer, ok := socketmap.Reply{}, "", false
	if h.stamps != nil {
		r, answer, ok = h.fromHot(name, key, now)
	}
	if !ok {
		var t trace
		r, answer = h.serve(ctx, name, key, now, &t)
		// A change while the reply was worked out has turned its stamps
		// stale already: it is kept, and never used.
		if t.keep {
			t.name, t.reply, t.kind = name, r, kindIndex(answer)
			h.keep(key, t.hotReply, now)
		}
	}
	if h.Observe != nil {
		h.Observe(answer, h.now().Sub(now))
	}
	return r
}

// init puts the hot table in use when what its replies come from can be
// watched: Cache is a stamper and DANE, when on, a daneStamper.
func (h *Handler) init() {
	s, ok := h.Cache.(stamper)
	if !ok {
		return
	}
	if h.DANE != nil {
		d, ok := h.DANE.(daneStamper)
		if !ok {
			return
		}
		h.daneStamps = d
	}
	h.stamps = s
}

func (h *Handler) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

// trace says whether a reply may be kept in the hot table, and gathers
// what would make it stale (the hotReply to keep, but for the reply
// itself). A nil trace records nothing.
type trace struct {
	keep bool
	hotReply
}

// serve answers a lookup and says which of the Answer* kinds the reply is.
// With t and the hot table in use, it records in t whether the reply came
// from the caches alone.
func (h *Handler) serve(ctx context.Context, name, key string, now time.Time, t *trace) (socketmap.Reply, string) {
	hop, err := ParseKey(key)
	if err != nil {
		return socketmap.NotFound(), AnswerNoPolicy // SPEC 2.4
	}
	domain, s := hop.Domain, h.Settings(name)
	if h.stamps != nil && t != nil {
		// Stamps first: a change made while the reply is worked out
		// turns them stale at once.
		t.policy = h.stamps.Stamp(domain)
		if h.daneStamps != nil {
			t.dane = h.daneStamps.Stamp(domain)
		}
		t.keep, t.until, t.settings = true, now.Add(hotTTL), s
	} else {
		t = nil
	}
	lvl, finish := h.daneLevel(ctx, hop, t)
	switch lvl {
	case dane.DaneOnly:
		return socketmap.OK("dane-only"), AnswerDaneOnly
	case dane.Dane:
		return socketmap.OK("dane"), AnswerDane
	case dane.Temp:
		// The MX hosts are DNSSEC-authenticated but their TLSA lookup
		// failed: Postfix itself defers in that case (RFC 7672 §2.2).
		return socketmap.Temp("DANE TLSA lookup failed"), AnswerTemp
	}
	e := lookup(ctx, h.Cache, domain, finish)
	if t != nil {
		// Kept only if e is the cached entry, as a hit returns it: not a
		// pending or uncached one from a discovery.
		cur, ok := h.stamps.Peek(domain)
		t.keep = t.keep && ok && cur == e
		t.until, t.hit = earlier(t.until, e.Expires), true
	}
	var text string
	var ok bool
	if e.Policy != nil {
		text, ok = Answer(domain, e.Policy, s)
	}
	switch {
	case ok && e.Policy.Mode == resolver.ModeTesting:
		return socketmap.OK(text), AnswerTesting
	case ok:
		return socketmap.OK(text), AnswerEnforce
	case e.Policy != nil && e.Policy.Mode == resolver.ModeNone:
		return socketmap.NotFound(), AnswerNone // SPEC 6.7
	default:
		return socketmap.NotFound(), AnswerNoPolicy // SPEC 7.2
	}
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// daneLevel returns the DANE level of the next hop, or dane.None when DANE
// is off or the check did not finish in time (it goes on in the background
// and its result is cached): a slow resolver must not defer mail. When the
// check has to wait on DNS, the policy lookup is begun first and finish
// completes it (see lookup). A non-nil t records whether the level came
// from the cache, and until when it may be reused.
func (h *Handler) daneLevel(ctx context.Context, hop Nexthop, t *trace) (lvl dane.Level, finish func(context.Context) *policycache.Entry) {
	if h.DANE == nil {
		return dane.None, nil
	}
	if t != nil {
		// The hot table is in use: h.DANE is a daneStamper.
		lvl, until, ok, err := h.daneStamps.CachedUntil(hop.Domain, hop.Port, hop.Bracketed)
		if ok {
			t.until = earlier(t.until, until)
			return daneResult(lvl, err), nil
		}
		t.keep = false
	} else if c, ok := h.DANE.(daneCache); ok {
		if lvl, ok, err := c.Cached(hop.Domain, hop.Port, hop.Bracketed); ok {
			return daneResult(lvl, err), nil
		}
	}
	// A DANE check that waits on DNS is a first contact, or nearly: the
	// MTA-STS discovery the lookup needs next, unless DANE takes
	// precedence, starts now and runs alongside, so the two cost one wait
	// rather than two.
	if b, ok := h.Cache.(beginner); ok {
		finish = b.Begin(hop.Domain)
	}
	ctx, cancel := context.WithTimeout(ctx, cmp.Or(h.DANETimeout, 5*time.Second))
	defer cancel()
	return daneResult(h.DANE.Check(ctx, hop.Domain, hop.Port, hop.Bracketed)), finish
}

// beginner is implemented by a Lookuper that can begin a lookup and finish
// it later, as policycache.Cache does (Begin).
type beginner interface {
	Begin(domain string) func(context.Context) *policycache.Entry
}

var _ beginner = (*policycache.Cache)(nil)

// lookup finishes the lookup daneLevel began, or makes one.
func lookup(ctx context.Context, c Lookuper, domain string, finish func(context.Context) *policycache.Entry) *policycache.Entry {
	if finish != nil {
		return finish(ctx)
	}
	return c.Lookup(ctx, domain)
}

// daneResult is the level of a DANE check that returned lvl and err: Temp
// only for a failed TLSA lookup, None for a check that did not finish.
func daneResult(lvl dane.Level, err error) dane.Level {
	if lvl == dane.Temp && !errors.Is(err, dane.ErrTLSALookup) {
		return dane.None
	}
	return lvl
}

// Result explains one lookup, for `stsmap query -json`.
type Result struct {
	Key      string     `json:"key"`
	Domain   string     `json:"domain,omitempty"`
	Found    bool       `json:"found"`
	Answer   string     `json:"answer,omitempty"`
	Reason   string     `json:"reason"`
	DANE     string     `json:"dane,omitempty"`
	Error    string     `json:"error,omitempty"`
	PolicyID string     `json:"policy_id,omitempty"`
	Mode     string     `json:"mode,omitempty"`
	MX       []string   `json:"mx,omitempty"`
	MaxAge   int64      `json:"max_age,omitempty"`
	Fetched  *time.Time `json:"fetched,omitempty"`
	Expires  *time.Time `json:"expires,omitempty"`
}

// Explain looks key up like ServeSocketmap and says why the answer is what
// it is. Reason is "policy" for a found policy; for NOTFOUND a skipped key's
// reason (SkipReason), a cache reason (no_record, invalid_record,
// dns_failure, fetch_failed, invalid_policy, discovery_pending), or
// mode_testing, mode_none, no_usable_mx for a policy that gives no answer;
// "dane" when a DANE level takes precedence (DANE says which).
func (h *Handler) Explain(ctx context.Context, key string, s Settings) Result {
	r := Result{Key: key}
	hop, err := ParseKey(key)
	if err != nil {
		r.Reason = SkipReason(err)
		return r
	}
	domain := hop.Domain
	r.Domain = domain
	lvl, finish := h.daneLevel(ctx, hop, nil)
	if lvl != dane.None {
		r.DANE, r.Reason = lvl.String(), "dane"
		if lvl != dane.Temp {
			r.Found, r.Answer = true, lvl.String()
		}
		return r
	}
	e := lookup(ctx, h.Cache, domain, finish)
	r.Reason, r.Error, r.PolicyID = string(e.Reason), e.Err, e.ID
	if !e.Fetched.IsZero() && e.Reason != policycache.ReasonPending {
		fetched, expires := e.Fetched.UTC(), e.Expires.UTC()
		r.Fetched, r.Expires = &fetched, &expires
	}
	if e.Policy == nil {
		return r
	}
	r.Mode, r.MX, r.MaxAge = string(e.Policy.Mode), e.Policy.MX, int64(e.Policy.MaxAge/time.Second)
	r.Answer, r.Found = Answer(domain, e.Policy, s)
	if !r.Found {
		r.Reason = notFoundReason(e, s)
	}
	return r
}

func notFoundReason(e *policycache.Entry, s Settings) string {
	switch {
	case e.Policy.Mode == resolver.ModeNone:
		return "mode_none"
	case e.Policy.Mode == resolver.ModeTesting && !s.StrictTesting:
		return "mode_testing"
	default:
		return "no_usable_mx"
	}
}
