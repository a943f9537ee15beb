package policymap

import (
	"fmt"
	"strings"
	"testing"

	"stsmap/internal/fixture"
	"stsmap/policycache"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// TestHostilePolicyAnswerSize: a hostile policy host fills the 64 KiB
// SPEC 4.5 allows with mx lines, which parse. Whatever they hold, the reply
// Postfix gets is OK and under its limit (SPEC 1.4, 1.3: never TEMP over a
// remote domain's policy); the optional TLSRPT attributes go first,
// policy_string before mx_host_pattern; match= keeps every pattern.
func TestHostilePolicyAnswerSize(t *testing.T) {
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63)
	tests := []struct {
		name string
		mx   func(i int) string
		// With TLSRPT on: whether the mx_host_pattern and the
		// policy_string attributes stay.
		wantPatterns, wantStrings bool
	}{
		// Thousands of policy lines, one pattern: the policy_string
		// attributes alone overflow.
		{name: "one name repeated", mx: func(int) string { return "mx1.example.com" }, wantPatterns: true},
		// Thousands of patterns: mx_host_pattern overflows too.
		{name: "unique short names", mx: func(i int) string { return fmt.Sprintf("m%d.example", i) }},
		{name: "unique wildcards", mx: func(i int) string { return fmt.Sprintf("*.w%d.example", i) }},
		{name: "unique long names", mx: func(i int) string { return fmt.Sprintf("h%d.%s.example", i, long) }},
	}
	settings := []struct {
		name string
		s    Settings
	}{
		{"plain", plain}, {"servername", sni}, {"strict", strict},
		{"tlsrpt", tlsrpt}, {"tlsrpt strict", Settings{StrictTesting: true, Servername: true, TLSRPT: true}},
	}
	for _, tt := range tests {
		body := fixture.MXPolicyOfSize(resolver.MaxPolicySize, tt.mx)
		if len(body) != resolver.MaxPolicySize {
			t.Fatalf("%s: policy of %d bytes, want %d", tt.name, len(body), resolver.MaxPolicySize)
		}
		p, err := resolver.ParsePolicy([]byte(body))
		if err != nil {
			t.Fatalf("%s: ParsePolicy: %v", tt.name, err)
		}
		entry := &policycache.Entry{Domain: "example.com", ID: "1", Reason: policycache.ReasonPolicy, Policy: p}
		for _, set := range settings {
			s := set.s
			t.Run(tt.name+"/"+set.name, func(t *testing.T) {
				h := &Handler{Cache: fakeCache{"example.com": entry}, Settings: func(string) Settings { return s }}
				r := h.ServeSocketmap(t.Context(), "postfix", "example.com")
				if r.Word != socketmap.WordOK {
					t.Fatalf("got %s %.80q, want OK", r.Word, r.Data)
				}
				n := len(socketmap.AppendReply(nil, r))
				t.Logf("%d mx, %d lines: reply of %d bytes", len(p.MX), len(p.Lines), n)
				if n >= socketmap.DefaultMaxReplySize {
					t.Errorf("reply of %d bytes, want less than %d", n, socketmap.DefaultMaxReplySize)
				}
				match, _, _ := strings.Cut(strings.TrimPrefix(r.Data, "secure match="), " ")
				if got, want := strings.Count(match, ":")+1, len(p.MX); got != want {
					t.Errorf("match= has %d patterns, want all %d of the policy", got, want)
				}
				for _, attr := range []struct {
					text string
					want bool
				}{
					{" servername=hostname", s.Servername},
					{" mx_host_pattern=", s.TLSRPT && tt.wantPatterns},
					{" { policy_string = ", s.TLSRPT && tt.wantStrings},
				} {
					if got := strings.Contains(r.Data, attr.text); got != attr.want {
						t.Errorf("answer has %q: %v, want %v", attr.text, got, attr.want)
					}
				}
				if s.TLSRPT && tt.wantPatterns {
					checkTLSRPT(t, "example.com", p, s, r.Data)
				}
			})
		}
	}
}
