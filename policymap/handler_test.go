package policymap

import (
	"context"
	"fmt"
	"testing"
	"time"

	"stsmap/dane"
	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

type fakeCache map[string]*policycache.Entry

func (f fakeCache) Lookup(ctx context.Context, domain string) *policycache.Entry {
	if e, ok := f[domain]; ok {
		return e
	}
	return &policycache.Entry{Domain: domain, Reason: policycache.ReasonNoRecord}
}

// fakeDANE answers a level per next hop and records what it was asked.
type fakeDANE struct {
	levels map[string]dane.Level
	errs   map[string]error
	asked  []string
}

func (f *fakeDANE) Check(ctx context.Context, nexthop string, port int, host bool) (dane.Level, error) {
	f.asked = append(f.asked, fmt.Sprintf("%s:%d:%v", nexthop, port, host))
	return f.levels[nexthop], f.errs[nexthop]
}

// SPEC 7.5: a DANE level takes precedence over MTA-STS; a TLSA lookup
// failure behind authenticated MX answers TEMP; a check that did not finish
// in time never defers mail.
func TestHandlerDANEPrecedence(t *testing.T) {
	sts := &policycache.Entry{Domain: "example.com", Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: time.Hour, MX: []string{"mx.example.com"}}}
	cache := fakeCache{"example.com": sts}
	d := &fakeDANE{
		levels: map[string]dane.Level{"all.example": dane.DaneOnly, "some.example": dane.Dane,
			"fail.example": dane.Temp, "slow.example": dane.Temp, "example.com": dane.None},
		errs: map[string]error{"fail.example": dane.ErrTLSALookup, "slow.example": context.DeadlineExceeded},
	}
	h := &Handler{Cache: cache, DANE: d, Settings: func(string) Settings { return Settings{Servername: true} }}
	tests := []struct {
		key  string
		want socketmap.Reply
	}{
		{"all.example", socketmap.OK("dane-only")},
		{"some.example", socketmap.OK("dane")},
		{"fail.example", socketmap.Temp("DANE TLSA lookup failed")},
		{"slow.example", socketmap.NotFound()},
		{"example.com", socketmap.OK("secure match=mx.example.com servername=hostname")},
		{".example.com", socketmap.NotFound()},
	}
	for _, tt := range tests {
		if got := h.ServeSocketmap(t.Context(), "postfix", tt.key); got != tt.want {
			t.Errorf("%s: got %+v, want %+v", tt.key, got, tt.want)
		}
	}
	h.DANE = nil
	if got := h.ServeSocketmap(t.Context(), "postfix", "all.example"); got != socketmap.NotFound() {
		t.Errorf("dane off: got %+v, want the MTA-STS answer (none here)", got)
	}
}

func TestNexthopShape(t *testing.T) {
	tests := []struct {
		key      string
		wantPort int
		wantHost bool
	}{
		{"example.com", 25, false},
		{"example.com:2525", 2525, false},
		{"[mail.example.com]", 25, true},
		{"[mail.example.com]:587", 587, true},
		{" [Mail.Example.com]:465 ", 465, true},
		{"[mail.example.com]:x", 25, true},
	}
	for _, tt := range tests {
		port, host := nexthopShape(tt.key)
		if port != tt.wantPort || host != tt.wantHost {
			t.Errorf("nexthopShape(%q) = %d, %v; want %d, %v", tt.key, port, host, tt.wantPort, tt.wantHost)
		}
	}
}

// Observe is told once per lookup what the answer was.
func TestHandlerObserve(t *testing.T) {
	policy := func(mode resolver.Mode) *policycache.Entry {
		return &policycache.Entry{Reason: policycache.ReasonPolicy,
			Policy: &resolver.Policy{Mode: mode, MaxAge: time.Hour, MX: []string{"mx.example.net"}}}
	}
	cache := fakeCache{
		"enforce.example": policy(resolver.ModeEnforce),
		"testing.example": policy(resolver.ModeTesting),
		"none.example":    policy(resolver.ModeNone),
		"nomx.example":    {Reason: policycache.ReasonPolicy, Policy: &resolver.Policy{Mode: resolver.ModeEnforce, MX: []string{"*"}}},
	}
	d := &fakeDANE{
		levels: map[string]dane.Level{"dane.example": dane.Dane, "daneonly.example": dane.DaneOnly, "temp.example": dane.Temp},
		errs:   map[string]error{"temp.example": dane.ErrTLSALookup},
	}
	tests := []struct {
		key    string
		strict bool
		want   string
	}{
		{"enforce.example", false, AnswerEnforce},
		{"testing.example", false, AnswerNoPolicy},
		{"testing.example", true, AnswerTesting},
		{"none.example", false, AnswerNone},
		{"nomx.example", false, AnswerNoPolicy},
		{"norecord.example", false, AnswerNoPolicy},
		{".example.com", false, AnswerNoPolicy},
		{"[192.0.2.1]", false, AnswerNoPolicy},
		{"dane.example", false, AnswerDane},
		{"daneonly.example", false, AnswerDaneOnly},
		{"temp.example", false, AnswerTemp},
	}
	for _, tt := range tests {
		var got []string
		h := &Handler{Cache: cache, DANE: d,
			Settings: func(string) Settings { return Settings{StrictTesting: tt.strict} },
			Observe: func(answer string, elapsed time.Duration) {
				if elapsed < 0 {
					t.Errorf("%s: negative elapsed %v", tt.key, elapsed)
				}
				got = append(got, answer)
			}}
		h.ServeSocketmap(t.Context(), "postfix", tt.key)
		if len(got) != 1 || got[0] != tt.want {
			t.Errorf("%s (strict testing %v): observed %q, want [%q]", tt.key, tt.strict, got, tt.want)
		}
	}
}
