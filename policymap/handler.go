package policymap

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"strings"
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
}

// answerMemo holds the answers rendered from one cache entry, for the last
// few map settings asked (one for most sites: every map name shares the
// settings of "*"). It lives in the entry's Memo and goes with it; a
// changed policy is a new entry with no memo. It is immutable once stored.
type answerMemo struct {
	slots [maxMemoSettings]answerSlot
	n     int
}

type answerSlot struct {
	s      Settings
	domain string
	text   string
	ok     bool
}

// maxMemoSettings bounds the settings an entry keeps answers for.
const maxMemoSettings = 4

// answer is Answer, memoized in the cache entry: for a policy answered
// before under the same settings it costs an atomic load and does not
// allocate.
func (h *Handler) answer(domain string, e *policycache.Entry, s Settings) (string, bool) {
	if e.Policy == nil {
		return "", false
	}
	m, _ := e.Memo.Load().(*answerMemo)
	if m != nil {
		for i := range m.n {
			if a := &m.slots[i]; a.s == s && a.domain == domain {
				return a.text, a.ok
			}
		}
	}
	text, ok := Answer(domain, e.Policy, s)
	if len(text) > maxMemoAnswer {
		return text, ok
	}
	// Keep the newest settings first; two lookups storing at once lose
	// one answer, which is rendered again next time.
	n := &answerMemo{}
	// The domain may be part of the socketmap request, which the memo
	// must not keep alive.
	n.slots[0] = answerSlot{s: s, domain: strings.Clone(domain), text: text, ok: ok}
	n.n = 1
	if m != nil {
		n.n += copy(n.slots[1:], m.slots[:m.n])
	}
	e.Memo.Store(n)
	return text, ok
}

// maxMemoAnswer is the longest answer kept rendered. A policy of 64 KiB
// renders an answer near Postfix's 100000-byte limit; keeping such answers
// would double what a remote party can make every cached entry hold. Real
// answers are a few hundred bytes.
const maxMemoAnswer = 4096

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
	if h.Observe == nil {
		r, _ := h.serve(ctx, name, key)
		return r
	}
	start := time.Now()
	r, answer := h.serve(ctx, name, key)
	h.Observe(answer, time.Since(start))
	return r
}

// serve answers a lookup and says which of the Answer* kinds the reply is.
func (h *Handler) serve(ctx context.Context, name, key string) (socketmap.Reply, string) {
	hop, err := ParseKey(key)
	if err != nil {
		return socketmap.NotFound(), AnswerNoPolicy // SPEC 2.4
	}
	domain := hop.Domain
	lvl, finish := h.daneLevel(ctx, hop)
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
	text, ok := h.answer(domain, e, h.Settings(name))
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

// daneLevel returns the DANE level of the next hop, or dane.None when DANE
// is off or the check did not finish in time (it goes on in the background
// and its result is cached): a slow resolver must not defer mail. When the
// check has to wait on DNS, the policy lookup is begun first and finish
// completes it (see lookup).
func (h *Handler) daneLevel(ctx context.Context, hop Nexthop) (lvl dane.Level, finish func(context.Context) *policycache.Entry) {
	if h.DANE == nil {
		return dane.None, nil
	}
	if c, ok := h.DANE.(daneCache); ok {
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
	lvl, finish := h.daneLevel(ctx, hop)
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
