package resolver

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// testPolicy is a minimal valid policy; tests derive others from it.
const testPolicy = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n"

// policyOf builds the Policy the table expects; Lines and Warnings are
// checked separately.
func policyOf(mode Mode, maxAge time.Duration, mx ...string) *Policy {
	return &Policy{Mode: mode, MaxAge: maxAge, MX: mx}
}

// withLine replaces the line of testPolicy that starts with prefix by
// line, or drops it when line is empty.
func withLine(prefix, line string) string {
	var lines []string
	for l := range strings.SplitSeq(strings.TrimSuffix(testPolicy, "\n"), "\n") {
		if strings.HasPrefix(l, prefix) {
			if line == "" {
				continue
			}
			l = line
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n") + "\n"
}

const day = 86400 * time.Second

// parsePolicyTests covers SPEC section 5; FuzzParsePolicy uses the bodies
// as its seed corpus.
var parsePolicyTests = []struct {
	name string
	body string
	// want is nil for an invalid policy. Its Lines are compared when
	// set; its Warnings are not, wantWarnings counts them.
	want         *Policy
	wantWarnings int
	// wantErr is a substring of the error of an invalid policy.
	wantErr string
}{
	// Line structure (SPEC 5.1).
	{name: "minimal enforce", body: testPolicy, want: &Policy{
		Mode: ModeEnforce, MaxAge: day, MX: []string{"mail.example.com"},
		Lines: []string{"version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 86400"},
	}},
	{name: "CRLF", body: strings.ReplaceAll(testPolicy, "\n", "\r\n"), want: &Policy{
		Mode: ModeEnforce, MaxAge: day, MX: []string{"mail.example.com"},
		Lines: []string{"version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 86400"},
	}},
	{name: "mixed LF and CRLF", body: "version: STSv1\r\nmode: enforce\nmx: mail.example.com\r\nmax_age: 86400", want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "no final line end", body: strings.TrimSuffix(testPolicy, "\n"), want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "trailing empty lines", body: testPolicy + "\n\r\n\n", want: &Policy{
		Mode: ModeEnforce, MaxAge: day, MX: []string{"mail.example.com"},
		Lines: []string{"version: STSv1", "mode: enforce", "mx: mail.example.com", "max_age: 86400"},
	}},
	{name: "trailing blank lines with WSP", body: testPolicy + "  \n\t\n", want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "empty line in the middle", body: "version: STSv1\nmode: enforce\n\nmx: mail.example.com\nmax_age: 86400\n", wantErr: "line 3: empty line"},
	{name: "blank line in the middle", body: "version: STSv1\n \t\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n", wantErr: "line 2: empty line"},
	{name: "leading empty line", body: "\n" + testPolicy, wantErr: "line 1: empty line"},
	{name: "empty body", body: "", wantErr: "empty policy"},
	{name: "only line ends", body: "\r\n\n", wantErr: "empty policy"},
	{name: "space before colon", body: withLine("mode", "mode : enforce"), wantErr: `line 2: space before ":" after key "mode"`},
	{name: "no space after colon", body: withLine("mode", "mode:enforce"), want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "tab after colon", body: withLine("mode", "mode:\tenforce"), want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "trailing WSP", body: "version: STSv1 \nmode: enforce\t\nmx: mail.example.com  \nmax_age: 86400 \t \n", want: &Policy{
		Mode: ModeEnforce, MaxAge: day, MX: []string{"mail.example.com"},
		Lines: []string{"version: STSv1 ", "mode: enforce\t", "mx: mail.example.com  ", "max_age: 86400 \t "},
	}},
	{name: "line without colon", body: testPolicy + "garbage\n", wantErr: `line 5: no ":"`},
	{name: "empty value", body: testPolicy + "comment:\n", wantErr: "line 5: empty value"},
	{name: "WSP-only value", body: testPolicy + "comment: \t \n", wantErr: "line 5: empty value"},
	{name: "empty key", body: testPolicy + ": value\n", wantErr: "line 5: invalid key"},
	{name: "key starting with underscore", body: testPolicy + "_x: value\n", wantErr: "line 5: invalid key"},
	{name: "key of 32 characters", body: testPolicy + strings.Repeat("k", 32) + ": v\n", want: policyOf(ModeEnforce, day, "mail.example.com")},
	{name: "key of 33 characters", body: testPolicy + strings.Repeat("k", 33) + ": v\n", wantErr: "line 5: invalid key"},
	{name: "control character in value", body: testPolicy + "comment: a\x01b\n", wantErr: "line 5: control character"},
	{name: "lone CR inside a line", body: "version: STSv1\rmode: enforce\nmx: mail.example.com\nmax_age: 86400\n", wantErr: "line 1: control character"},
	{name: "CR at the very end", body: testPolicy + "comment: x\r", wantErr: "line 5: control character"},
	{name: "DEL in value", body: testPolicy + "comment: a\x7f\n", wantErr: "line 5: control character"},
	{name: "invalid UTF-8 in value", body: testPolicy + "comment: \xff\xfe\n", wantErr: "line 5: value of \"comment\" is not valid UTF-8"},
	{name: "too large", body: testPolicy + "comment: " + strings.Repeat("a", MaxPolicySize) + "\n", wantErr: "larger than 65536"},

	// Required fields and their values (SPEC 5.2).
	{name: "mode Enforce", body: withLine("mode", "mode: Enforce"), wantErr: `line 2: mode "Enforce" is not enforce, testing or none`},
	{name: "mode unknown", body: withLine("mode", "mode: strict"), wantErr: "line 2: mode"},
	{name: "version stsv1", body: withLine("version", "version: stsv1"), wantErr: `line 1: version "stsv1" is not STSv1`},
	{name: "version STSv2", body: withLine("version", "version: STSv2"), wantErr: "line 1: version"},
	{name: "missing version", body: withLine("version", ""), wantErr: "missing version"},
	{name: "missing mode", body: withLine("mode", ""), wantErr: "missing mode"},
	{name: "missing max_age", body: withLine("max_age", ""), wantErr: "missing max_age"},
	{name: "key Mode is an extension", body: withLine("mode", "Mode: enforce"), wantErr: "missing mode"},
	{name: "max_age 0", body: withLine("max_age", "max_age: 0"), want: policyOf(ModeEnforce, 0, "mail.example.com")},
	{name: "max_age 10 digits capped", body: withLine("max_age", "max_age: 9999999999"), want: policyOf(ModeEnforce, MaxMaxAge, "mail.example.com"), wantWarnings: 1},
	{name: "max_age 11 digits", body: withLine("max_age", "max_age: 12345678901"), wantErr: `line 4: max_age "12345678901" is not 1 to 10 digits`},
	{name: "max_age 31557600", body: withLine("max_age", "max_age: 31557600"), want: policyOf(ModeEnforce, MaxMaxAge, "mail.example.com")},
	{name: "max_age 31557601 capped", body: withLine("max_age", "max_age: 31557601"), want: policyOf(ModeEnforce, MaxMaxAge, "mail.example.com"), wantWarnings: 1},
	{name: "max_age leading zeros", body: withLine("max_age", "max_age: 0000000060"), want: policyOf(ModeEnforce, time.Minute, "mail.example.com")},
	{name: "max_age negative", body: withLine("max_age", "max_age: -1"), wantErr: "line 4: max_age"},
	{name: "max_age with unit", body: withLine("max_age", "max_age: 86400s"), wantErr: "line 4: max_age"},
	{name: "max_age with inner space", body: withLine("max_age", "max_age: 86 400"), wantErr: "line 4: max_age"},

	// Repeated and unknown keys (SPEC 5.4).
	{name: "repeated mode keeps the first", body: testPolicy + "mode: testing\n", want: policyOf(ModeEnforce, day, "mail.example.com"), wantWarnings: 1},
	{name: "repeated mode first is testing", body: "version: STSv1\nmode: testing\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n", want: policyOf(ModeTesting, day, "mail.example.com"), wantWarnings: 1},
	{name: "repeated version with another value ignored", body: testPolicy + "version: STSv2\n", want: policyOf(ModeEnforce, day, "mail.example.com"), wantWarnings: 1},
	{name: "repeated max_age keeps the first", body: testPolicy + "max_age: 60\n", want: policyOf(ModeEnforce, day, "mail.example.com"), wantWarnings: 1},
	{name: "first mode invalid, second valid", body: "version: STSv1\nmode: Enforce\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n", wantErr: "line 2: mode"},
	{name: "unknown keys ignored", body: "version: STSv1\nfoo_bar: baz qux\nmode: enforce\nx-1.y: 1\nmx: mail.example.com\ncomment: héllo wörld ✉\nmax_age: 86400\n", want: policyOf(ModeEnforce, day, "mail.example.com")},

	// mx (SPEC 5.3).
	{name: "repeated mx lowercased and deduplicated", body: "version: STSv1\nmode: enforce\nmx: Mail.Example.COM\nmx: mail.example.com\nmx: *.example.net\nmx: MX2.example.com\nmx: *.EXAMPLE.net\nmax_age: 86400\n",
		want: policyOf(ModeEnforce, day, "mail.example.com", "*.example.net", "mx2.example.com")},
	{name: "wildcard mx", body: withLine("mx", "mx: *.example.net"), want: policyOf(ModeEnforce, day, "*.example.net")},
	{name: "single-label mx", body: withLine("mx", "mx: localhost"), want: policyOf(ModeEnforce, day, "localhost")},
	{name: "A-label mx", body: withLine("mx", "mx: mx.xn--bcher-kva.example"), want: policyOf(ModeEnforce, day, "mx.xn--bcher-kva.example")},
	{name: "uppercase A-label mx", body: withLine("mx", "mx: *.XN--Bcher-KVA.example"), want: policyOf(ModeEnforce, day, "*.xn--bcher-kva.example")},
	{name: "U-label mx", body: withLine("mx", "mx: mx.bücher.example"), wantErr: "line 3: mx \"mx.b\\u00fccher.example\": non-ASCII"},
	{name: "invalid A-label mx", body: withLine("mx", "mx: xn--a.example"), wantErr: "not a valid A-label"},
	{name: "truncated punycode", body: withLine("mx", "mx: xn--abc-9.example"), wantErr: "not a valid A-label"},
	{name: "A-label of uppercase", body: withLine("mx", "mx: xn--bcher-2pa.example"), wantErr: "not a valid A-label"},
	{name: "IP literal mx dropped", body: "version: STSv1\nmode: enforce\nmx: 192.0.2.1\nmx: [192.0.2.2]\nmx: 2001:db8::1\nmx: [IPv6:2001:db8::2]\nmx: ::ffff:192.0.2.3\nmx: mail.example.com\nmax_age: 86400\n",
		want: policyOf(ModeEnforce, day, "mail.example.com"), wantWarnings: 5},
	{name: "warnings bounded", body: testPolicy + strings.Repeat("mx: 192.0.2.1\n", 20), want: policyOf(ModeEnforce, day, "mail.example.com"), wantWarnings: maxPolicyWarnings},
	{name: "only IP literal mx with enforce", body: withLine("mx", "mx: 192.0.2.1"), wantErr: "no mx left for mode enforce after dropping 1 IP literals"},
	{name: "bad address literal", body: withLine("mx", "mx: [mail.example.com]"), wantErr: "not a valid address literal"},
	{name: "mode none without mx", body: "version: STSv1\nmode: none\nmax_age: 86400\n", want: policyOf(ModeNone, day)},
	{name: "mode none with mx", body: withLine("mode", "mode: none"), want: policyOf(ModeNone, day, "mail.example.com")},
	{name: "mode none with invalid mx", body: "version: STSv1\nmode: none\nmx: a_b.example\nmax_age: 86400\n", wantErr: "line 3: mx"},
	{name: "testing without mx", body: "version: STSv1\nmode: testing\nmax_age: 86400\n", wantErr: "no mx for mode testing"},
	{name: "enforce without mx", body: "version: STSv1\nmode: enforce\nmax_age: 86400\n", wantErr: "no mx for mode enforce"},
	{name: "mx underscore", body: withLine("mx", "mx: mail_1.example.com"), wantErr: `character '_' not allowed`},
	{name: "mx inner space", body: withLine("mx", "mx: mail example.com"), wantErr: `character ' ' not allowed`},
	{name: "mx slash", body: withLine("mx", "mx: mail.example.com/x"), wantErr: `character '/' not allowed`},
	{name: "mx wildcard in the middle", body: withLine("mx", "mx: mail.*.example.com"), wantErr: `"*" is allowed only`},
	{name: "mx wildcard without dot", body: withLine("mx", "mx: *example.com"), wantErr: `"*" is allowed only`},
	{name: "mx double wildcard", body: withLine("mx", "mx: *.*.example.com"), wantErr: `"*" is allowed only`},
	{name: "mx bare wildcard", body: withLine("mx", "mx: *"), wantErr: `"*" is allowed only`},
	{name: "mx wildcard alone with dot", body: withLine("mx", "mx: *."), wantErr: "empty label"},
	{name: "mx empty label", body: withLine("mx", "mx: mail..example.com"), wantErr: "empty label"},
	{name: "mx leading dot", body: withLine("mx", "mx: .example.com"), wantErr: "empty label"},
	{name: "mx trailing dot", body: withLine("mx", "mx: mail.example.com."), wantErr: "empty label"},
	{name: "mx label starting with hyphen", body: withLine("mx", "mx: -mail.example.com"), wantErr: "label starts or ends"},
	{name: "mx label ending with hyphen", body: withLine("mx", "mx: mail-.example.com"), wantErr: "label starts or ends"},
	{name: "mx label of 63", body: withLine("mx", "mx: "+strings.Repeat("a", 63)+".example"), want: policyOf(ModeEnforce, day, strings.Repeat("a", 63)+".example")},
	{name: "mx label of 64", body: withLine("mx", "mx: "+strings.Repeat("a", 64)+".example"), wantErr: "label longer than 63"},
	{name: "mx name of 253", body: withLine("mx", "mx: "+longName(253)), want: policyOf(ModeEnforce, day, longName(253))},
	{name: "mx name of 254", body: withLine("mx", "mx: "+longName(254)), wantErr: "longer than 253"},

	// Lines (SPEC 5.6).
	{name: "lines as fetched", body: "version: STSv1\r\nmode:testing \r\nMX: ignored\r\nmx: MAIL.example.com\r\nmax_age: 604800\r\nnote: ✉ ok\r\n\r\n\r\n",
		want: &Policy{
			Mode: ModeTesting, MaxAge: 7 * day, MX: []string{"mail.example.com"},
			Lines: []string{"version: STSv1", "mode:testing ", "MX: ignored", "mx: MAIL.example.com", "max_age: 604800", "note: ✉ ok"},
		}},
}

// longName returns a valid host name of exactly n characters.
func longName(n int) string {
	var b strings.Builder
	for b.Len() < n {
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.WriteString(strings.Repeat("a", min(63, n-b.Len())))
	}
	s := b.String()
	if strings.HasSuffix(s, ".") || len(s) != n {
		panic(fmt.Sprintf("longName(%d) = %q", n, s))
	}
	return s
}

func TestParsePolicy(t *testing.T) {
	for _, tc := range parsePolicyTests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePolicy([]byte(tc.body))
			if tc.want == nil {
				checkPolicyError(t, err, tc.wantErr)
				return
			}
			if err != nil {
				t.Fatalf("ParsePolicy: got error %v, want a policy", err)
			}
			checkPolicy(t, got, tc.want)
			if len(got.Warnings) != tc.wantWarnings {
				t.Errorf("got %d warnings %q, want %d", len(got.Warnings), got.Warnings, tc.wantWarnings)
			}
			checkPolicyInvariants(t, got, []byte(tc.body))
		})
	}
}

func TestParsePolicyWarningText(t *testing.T) {
	body := "version: STSv1\nmode: enforce\nmx: [192.0.2.1]\nmx: mail.example.com\nmax_age: 99999999\nmode: none\n"
	got, err := ParsePolicy([]byte(body))
	if err != nil {
		t.Fatalf("ParsePolicy: %v", err)
	}
	want := []string{
		`line 3: mx "[192.0.2.1]" is an IP literal, dropped`,
		"line 5: max_age 99999999 capped at 31557600",
		"line 6: repeated mode ignored (the first counts)",
	}
	if !slices.Equal(got.Warnings, want) {
		t.Errorf("got warnings %q, want %q", got.Warnings, want)
	}
}

func TestParsePolicyErrorIsBounded(t *testing.T) {
	long := strings.Repeat("\u2028", 5000)
	for _, body := range []string{
		withLine("mode", "mode: "+long),
		withLine("mx", "mx: "+long),
		withLine("mx", "mx: "+strings.Repeat("a", 60000)),
		testPolicy + strings.Repeat("k", 60000) + ": v\n",
		testPolicy + "comment: " + long + "\x00\n",
	} {
		_, err := ParsePolicy([]byte(body))
		checkPolicyError(t, err, "line ")
	}
}

// checkPolicyError checks a ParsePolicy error: it matches ErrInvalidPolicy,
// contains want and is short enough to log (SPEC 8.3).
func checkPolicyError(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("ParsePolicy: got no error, want one containing %q", want)
	}
	if !errors.Is(err, ErrInvalidPolicy) {
		t.Errorf("got error %v, want one matching ErrInvalidPolicy", err)
	}
	if got := err.Error(); !strings.Contains(got, want) {
		t.Errorf("got error %q, want it to contain %q", got, want)
	}
	if got, limit := len(err.Error()), 400; got > limit {
		t.Errorf("got an error of %d bytes, want at most %d: %.100q...", got, limit, err.Error())
	}
}

// checkPolicy compares the fields the table sets.
func checkPolicy(t *testing.T, got, want *Policy) {
	t.Helper()
	if got.Mode != want.Mode {
		t.Errorf("got mode %q, want %q", got.Mode, want.Mode)
	}
	if got.MaxAge != want.MaxAge {
		t.Errorf("got max age %v, want %v", got.MaxAge, want.MaxAge)
	}
	if !slices.Equal(got.MX, want.MX) {
		t.Errorf("got mx %q, want %q", got.MX, want.MX)
	}
	if want.Lines != nil && !slices.Equal(got.Lines, want.Lines) {
		t.Errorf("got lines %q, want %q", got.Lines, want.Lines)
	}
}

// checkPolicyInvariants checks what every accepted policy satisfies (SPEC
// 5.2, 5.3, 5.6, 8.3), whatever the body.
func checkPolicyInvariants(t *testing.T, p *Policy, body []byte) {
	t.Helper()
	switch p.Mode {
	case ModeEnforce, ModeTesting:
		if len(p.MX) == 0 {
			t.Errorf("mode %q with no mx", p.Mode)
		}
	case ModeNone:
	default:
		t.Errorf("invalid mode %q", p.Mode)
	}
	if p.MaxAge < 0 || p.MaxAge > MaxMaxAge || p.MaxAge%time.Second != 0 {
		t.Errorf("max age %v outside [0, %v] or not whole seconds", p.MaxAge, MaxMaxAge)
	}
	seen := make(map[string]bool)
	for _, mx := range p.MX {
		if seen[mx] {
			t.Errorf("duplicate mx %q in %q", mx, p.MX)
		}
		seen[mx] = true
		if mx != strings.ToLower(mx) {
			t.Errorf("mx %q not lowercase", mx)
		}
		if _, isIP, reason := parseMXPattern(mx); isIP || reason != "" {
			t.Errorf("mx %q is not a valid pattern (IP literal %v, %q)", mx, isIP, reason)
		}
		for i := 0; i < len(mx); i++ {
			if c := mx[i]; !isAlnum(c) && c != '-' && c != '.' && !(i == 0 && c == '*') {
				t.Errorf("mx %q has byte %q", mx, c)
			}
		}
	}
	if len(p.Lines) == 0 || len(p.Lines) > strings.Count(string(body), "\n")+1 {
		t.Errorf("got %d lines from a body with %d line ends", len(p.Lines), strings.Count(string(body), "\n"))
	}
	for _, l := range p.Lines {
		if strings.ContainsAny(l, "\r\n") {
			t.Errorf("line %q holds a line end", l)
		}
	}
	if last := p.Lines[len(p.Lines)-1]; strings.Trim(last, " \t") == "" {
		t.Errorf("trailing blank line %q kept", last)
	}
	if len(p.Warnings) > maxPolicyWarnings {
		t.Errorf("got %d warnings, want at most %d", len(p.Warnings), maxPolicyWarnings)
	}
	for _, w := range p.Warnings {
		if len(w) > 200 {
			t.Errorf("warning of %d bytes: %.100q...", len(w), w)
		}
	}
}

func FuzzParsePolicy(f *testing.F) {
	for _, tc := range parsePolicyTests {
		// Large seeds slow every mutation; the size limit needs no
		// fuzzing.
		if len(tc.body) <= 4096 {
			f.Add([]byte(tc.body))
		}
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		p, err := ParsePolicy(body)
		if err != nil {
			if !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("got error %v, want one matching ErrInvalidPolicy", err)
			}
			if len(err.Error()) > 400 {
				t.Fatalf("got an error of %d bytes: %.100q...", len(err.Error()), err.Error())
			}
			return
		}
		checkPolicyInvariants(t, p, body)
	})
}

func TestValidALabel(t *testing.T) {
	tests := []struct {
		label string
		want  bool
	}{
		{"xn--bcher-kva", true},
		{"xn--mnchen-3ya", true},
		{"xn--strae-oqa", true},
		{"xn--80ak6aa92e", true},
		{"xn--nxa", true},
		{"xn--ls8h", true},
		{"xn--abc-", false},            // ASCII only
		{"xn--abc-9", false},           // truncated
		{"xn--a", false},               // U+0080, a control character
		{"xn--abc", false},             // controls
		{"xn--bcher-2pa", false},       // "bÜcher": uppercase
		{"xn--ab-r13a", false},         // "a。b": a label separator
		{"xn--ab-g1t", false},          // U+200B ZERO WIDTH SPACE: a format character
		{"xn--ab-je4l", false},         // U+E000: private use
		{"xn--ab-h4b", false},          // U+0378: unassigned
		{"xn--53h", true},              // "☕": UTS 46 allows symbols
		{"xn--a-ecp", false},           // "a⒈": U+2488 maps to "1."
		{"xn--99999999999999a", false}, // overflow
		{"xn--", false},
	}
	for _, tc := range tests {
		if got := validALabel(tc.label); got != tc.want {
			t.Errorf("validALabel(%q) = %v, want %v", tc.label, got, tc.want)
		}
	}
}

func BenchmarkParsePolicy(b *testing.B) {
	body := []byte("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: mx2.example.com\r\nmx: *.mail.example.net\r\nmx: backup.example.org\r\nmax_age: 604800\r\n")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParsePolicy(body); err != nil {
			b.Fatal(err)
		}
	}
}
