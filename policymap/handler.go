package policymap

import (
	"context"
	"log/slog"
	"time"

	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// Lookuper is what the handler needs from the policy cache.
type Lookuper interface {
	Lookup(ctx context.Context, domain string) *policycache.Entry
}

var _ Lookuper = (*policycache.Cache)(nil)

// Handler answers Postfix's smtp_tls_policy_maps lookups (SPEC 2, 7).
type Handler struct {
	Cache Lookuper
	// Settings returns the settings of a socketmap map name (the last
	// field of socketmap:inet:HOST:PORT:NAME).
	Settings func(mapName string) Settings
	Logger   *slog.Logger
}

var _ socketmap.Handler = (*Handler)(nil)

// ServeSocketmap implements socketmap.Handler. It never answers TEMP for a
// remote domain's fault (SPEC 1.3): whatever discovery finds, the answer is
// a policy or NOTFOUND.
func (h *Handler) ServeSocketmap(ctx context.Context, name, key string) socketmap.Reply {
	domain, err := NormalizeKey(key)
	if err != nil {
		return socketmap.NotFound() // SPEC 2.4
	}
	e := h.Cache.Lookup(ctx, domain)
	text, ok := Answer(domain, e.Policy, h.Settings(name))
	if !ok {
		return socketmap.NotFound() // SPEC 7.2
	}
	return socketmap.OK(text)
}

// Result explains one lookup, for `stsmap query -json`.
type Result struct {
	Key      string     `json:"key"`
	Domain   string     `json:"domain,omitempty"`
	Found    bool       `json:"found"`
	Answer   string     `json:"answer,omitempty"`
	Reason   string     `json:"reason"`
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
// mode_testing, mode_none, no_usable_mx for a policy that gives no answer.
func Explain(ctx context.Context, c Lookuper, key string, s Settings) Result {
	r := Result{Key: key}
	domain, err := NormalizeKey(key)
	if err != nil {
		r.Reason = SkipReason(err)
		return r
	}
	r.Domain = domain
	e := c.Lookup(ctx, domain)
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
