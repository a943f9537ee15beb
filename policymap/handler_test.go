package policymap

import (
	"context"
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	"stsmap/dane"
	"stsmap/internal/fixture"
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

// ParseKey says how Postfix reaches the next hop: the port (25 unless
// given) and whether it is bracketed, with no MX lookup (SPEC 2.3, 7.5).
func TestParseKey(t *testing.T) {
	tests := []struct {
		key  string
		want Nexthop
	}{
		{"example.com", Nexthop{"example.com", 25, false}},
		{"example.com:2525", Nexthop{"example.com", 2525, false}},
		{"[mail.example.com]", Nexthop{"mail.example.com", 25, true}},
		{"[mail.example.com]:587", Nexthop{"mail.example.com", 587, true}},
		{" [Mail.Example.com]:465 ", Nexthop{"mail.example.com", 465, true}},
	}
	for _, tt := range tests {
		got, err := ParseKey(tt.key)
		if err != nil || got != tt.want {
			t.Errorf("ParseKey(%q) = %+v, %v; want %+v", tt.key, got, err, tt.want)
		}
	}
	if _, err := ParseKey("[mail.example.com]:x"); SkipReason(err) != "invalid_name" {
		t.Errorf("ParseKey with a bad port: got %v, want invalid_name", err)
	}
}

// slowSource is a policycache.Source whose discovery takes delay.
type slowSource struct {
	delay time.Duration
	mx    string
}

func (s slowSource) LookupRecord(ctx context.Context, domain string) (resolver.Record, error) {
	time.Sleep(s.delay)
	return resolver.Record{ID: "1"}, nil
}

func (s slowSource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	return &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: time.Hour, MX: []string{s.mx}}, nil
}

// slowDANE is a DANE checker whose check takes delay and finds no DANE.
type slowDANE struct{ delay time.Duration }

func (d slowDANE) Check(ctx context.Context, nexthop string, port int, host bool) (dane.Level, error) {
	time.Sleep(d.delay)
	return dane.None, nil
}

// On first contact the DANE check and the MTA-STS discovery run at once:
// the lookup takes the longer of the two, not their sum.
func TestHandlerFirstContactInParallel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const delay = 300 * time.Millisecond
		cache := policycache.New(slowSource{delay: delay, mx: "mx.example.com"}, policycache.Config{Logger: fixture.QuietLogger()})
		defer cache.Close()
		h := &Handler{Cache: cache, DANE: slowDANE{delay: delay}, Settings: func(string) Settings { return Settings{} }}
		start := time.Now()
		got := h.ServeSocketmap(t.Context(), "postfix", "example.com")
		if want := socketmap.OK("secure match=mx.example.com"); got != want {
			t.Fatalf("got %+v, want %+v", got, want)
		}
		if took := time.Since(start); took != delay {
			t.Errorf("first contact took %v (fake time), want %v: the DANE check and the discovery ran one after the other", took, delay)
		}
	})
}
