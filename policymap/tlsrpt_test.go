package policymap

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"stsmap/resolver"
	"stsmap/socketmap"
)

// stsPolicy is a policy as the parser returns it: MX lowercased and
// deduplicated, Lines as fetched (SPEC 5.3, 5.6).
func stsPolicy(mode resolver.Mode, mx []string, lines ...string) *resolver.Policy {
	return &resolver.Policy{Mode: mode, MaxAge: 24 * time.Hour, MX: mx, Lines: lines}
}

// ps is the policy_string attribute of line.
func ps(line string) string { return " { policy_string = " + line + " }" }

func TestAnswerTLSRPT(t *testing.T) {
	const sts = " policy_type=sts policy_domain=example.com"
	tests := []struct {
		name     string
		domain   string
		policy   *resolver.Policy
		settings Settings
		want     string // "" means NOTFOUND
	}{
		// SPEC 7.3
		{"plain mx", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"mx1.example.com", "mx2.example.com"},
			"version: STSv1", "mode: enforce", "mx: mx1.example.com", "mx: mx2.example.com", "max_age: 604800"),
			tlsrpt,
			"secure match=mx1.example.com:mx2.example.com servername=hostname" + sts +
				" mx_host_pattern=mx1.example.com mx_host_pattern=mx2.example.com" +
				ps("version: STSv1") + ps("mode: enforce") + ps("mx: mx1.example.com") + ps("mx: mx2.example.com") + ps("max_age: 604800")},
		{"wildcard mx", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"mx.example.com", "*.mail.example.net"},
			"version: STSv1", "mode: enforce", "mx: mx.example.com", "mx: *.mail.example.net", "max_age: 86400"),
			tlsrpt,
			"secure match=mx.example.com:.mail.example.net servername=hostname" + sts +
				" mx_host_pattern=mx.example.com mx_host_pattern=*.mail.example.net" +
				ps("version: STSv1") + ps("mode: enforce") + ps("mx: mx.example.com") + ps("mx: *.mail.example.net") + ps("max_age: 86400")},
		// The parser has deduplicated MX; the lines stay as published.
		{"repeated mx", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"mx1.example.com", "*.example.net"},
			"version: STSv1", "mode: enforce", "mx: mx1.example.com", "mx: *.example.net", "mx: MX1.Example.COM", "mx: mx1.example.com", "max_age: 86400"),
			tlsrpt,
			"secure match=mx1.example.com:.example.net servername=hostname" + sts +
				" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net" +
				ps("version: STSv1") + ps("mode: enforce") + ps("mx: mx1.example.com") + ps("mx: *.example.net") +
				ps("mx: MX1.Example.COM") + ps("mx: mx1.example.com") + ps("max_age: 86400")},
		{"duplicates left by the caller", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"mx1.example.com", "MX1.example.com", "*.example.net", "*.EXAMPLE.net"}),
			tlsrpt,
			"secure match=mx1.example.com:.example.net servername=hostname" + sts +
				" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net"},
		{"without servername", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"mx1.example.com", "*.example.net"}, "version: STSv1", "mode: enforce"),
			Settings{TLSRPT: true},
			"secure match=mx1.example.com:.example.net" + sts +
				" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net" + ps("version: STSv1") + ps("mode: enforce")},
		{"strict testing", "example.com", stsPolicy(resolver.ModeTesting,
			[]string{"*.example.net"}, "version: STSv1", "mode: testing", "mx: *.example.net", "max_age: 86400"),
			Settings{StrictTesting: true, Servername: true, TLSRPT: true},
			"secure match=.example.net servername=hostname" + sts + " mx_host_pattern=*.example.net" +
				ps("version: STSv1") + ps("mode: testing") + ps("mx: *.example.net") + ps("max_age: 86400")},
		{"testing", "example.com", stsPolicy(resolver.ModeTesting, []string{"mx1.example.com"}, "mode: testing"), tlsrpt, ""},
		{"none", "example.com", stsPolicy(resolver.ModeNone, nil, "mode: none"), Settings{StrictTesting: true, TLSRPT: true}, ""},
		{"no usable mx", "example.com", stsPolicy(resolver.ModeEnforce, []string{"hostname", "*"}, "mx: hostname"), tlsrpt, ""},
		{"off", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, "version: STSv1"), sni,
			"secure match=mx1.example.com servername=hostname"},

		// mx_host_pattern lists exactly the patterns of match=.
		{"patterns dropped from match= are dropped", "example.com", stsPolicy(resolver.ModeEnforce,
			[]string{"hostname", "*", "mx1.example.com:evil.example", "mx2.example.com mx_host_pattern=evil.example", "mx1.example.com"}),
			tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com"},

		// policy_string values (SPEC 7.3): no "{", "}", control characters
		// or invalid UTF-8; trimmed; empty ones skipped.
		{"no lines", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com"},
		{"empty lines skipped", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"", "   ", "{}", "\t\r", "{ }", "mode: enforce"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" + ps("mode: enforce")},
		{"spaces trimmed", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"  max_age: 86400  ", "mode:\tenforce\t", "\tmx:  mx1.example.com"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" +
				ps("max_age: 86400") + ps("mode:enforce") + ps("mx:  mx1.example.com")},
		{"braces cannot close the attribute", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"x } policy_type=evil {", "}}} { policy_string = y", "{match=evil.example}"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" +
				ps("x  policy_type=evil") + ps("policy_string = y") + ps("match=evil.example")},
		{"control characters removed", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"mode: enforce\r", "a\x00b\x1bc\x7fd", "e\nf", "\u0085g\u009fh"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" +
				ps("mode: enforce") + ps("abcd") + ps("ef") + ps("gh")},
		{"UTF-8 kept, invalid bytes dropped", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"note: café ☃ \U0001F4E7", "bad: \xff\xfeok\xe2\x82", "\xed\xa0\x80surrogate", "x: \uFFFD"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" +
				ps("note: café ☃ \U0001F4E7") + ps("bad: ok") + ps("surrogate") + ps("x: \uFFFD")},
		{"commas and equals signs kept", "example.com", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"},
			"x-note: a, b = c,d"), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com" + ps("x-note: a, b = c,d")},

		// policy_domain must be a host name, or Postfix refuses the answer.
		{"domain lowercased", "Example.COM", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}), tlsrpt,
			"secure match=mx1.example.com servername=hostname" + sts + " mx_host_pattern=mx1.example.com"},
		{"A-label domain", "xn--bcher-kva.example", stsPolicy(resolver.ModeEnforce, []string{"mx.xn--bcher-kva.example"}), tlsrpt,
			"secure match=mx.xn--bcher-kva.example servername=hostname policy_type=sts policy_domain=xn--bcher-kva.example" +
				" mx_host_pattern=mx.xn--bcher-kva.example"},
		{"empty domain", "", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, "mode: enforce"), tlsrpt,
			"secure match=mx1.example.com servername=hostname"},
		{"domain with a space", "example.com policy_failure=sts-webpki-invalid", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, "mode: enforce"), tlsrpt,
			"secure match=mx1.example.com servername=hostname"},
		{"U-label domain", "bücher.example", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, "mode: enforce"), tlsrpt,
			"secure match=mx1.example.com servername=hostname"},
		{"IP address domain", "192.0.2.1", stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, "mode: enforce"), tlsrpt,
			"secure match=mx1.example.com servername=hostname"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkAnswer(t, tt.domain, tt.policy, tt.settings, tt.want)
			if tt.want != "" {
				checkTLSRPT(t, tt.domain, tt.policy, tt.settings, tt.want)
			}
		})
	}
}

// manyLines returns lines of n bytes each, "k00001: vvv...", filling a
// policy of size bytes with CRLF line endings.
func manyLines(size, n int) []string {
	var lines []string
	for i := 0; (len(lines)+1)*(n+2) <= size; i++ {
		key := fmt.Sprintf("k%05d: ", i)
		lines = append(lines, key+strings.Repeat("v", n-len(key)))
	}
	return lines
}

// TestAnswerTLSRPTLargePolicy answers a policy of 64 KiB, the largest
// body fetched (SPEC 4.5), whose policy_string attributes would take the
// reply over Postfix's limit: they are left out, the rest stays (SPEC 1.4).
func TestAnswerTLSRPTLargePolicy(t *testing.T) {
	mx := []string{"mx1.example.com", "*.example.net"}
	lines := []string{"version: STSv1", "mode: enforce", "mx: mx1.example.com", "mx: *.example.net", "max_age: 86400"}
	size := 0
	for _, line := range lines {
		size += len(line) + len("\r\n")
	}
	lines = append(lines, manyLines(resolver.MaxPolicySize-size, 10)...)
	want := "secure match=mx1.example.com:.example.net servername=hostname policy_type=sts policy_domain=example.com" +
		" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net"
	checkAnswer(t, "example.com", stsPolicy(resolver.ModeEnforce, mx, lines...), tlsrpt, want)
	checkTLSRPT(t, "example.com", stsPolicy(resolver.ModeEnforce, mx, lines...), tlsrpt, want)
}

// TestAnswerTLSRPTSizeLimit fills the reply to one byte under Postfix's
// limit, where the policy_string attributes stay, and to the limit, where
// they go.
func TestAnswerTLSRPTSizeLimit(t *testing.T) {
	p := stsPolicy(resolver.ModeEnforce, []string{"mx1.example.com"}, manyLines(60000, 40)...)
	head, _ := Answer("example.com", &resolver.Policy{Mode: p.Mode, MX: p.MX}, tlsrpt)
	full, _ := Answer("example.com", p, tlsrpt)
	if full == head {
		t.Fatalf("the policy_string attributes of %d lines of 40 bytes are dropped", len(p.Lines))
	}
	// Pad the last line until the reply is one byte under the limit.
	room := socketmap.DefaultMaxReplySize - 1 - replyLen(full)
	if room <= 0 {
		t.Fatalf("the test policy's reply is %d bytes already", replyLen(full))
	}
	p.Lines[len(p.Lines)-1] += strings.Repeat("w", room)
	got, _ := Answer("example.com", p, tlsrpt)
	if n := replyLen(got); n != socketmap.DefaultMaxReplySize-1 {
		t.Fatalf("padded reply: got %d bytes, want %d", n, socketmap.DefaultMaxReplySize-1)
	}
	if !strings.HasSuffix(got, "w }") {
		t.Errorf("reply of %d bytes: the policy_string attributes are gone", replyLen(got))
	}
	p.Lines[len(p.Lines)-1] += "w"
	if got, _ := Answer("example.com", p, tlsrpt); got != head {
		t.Errorf("reply of the limit's size: got %d bytes, want the policy_string attributes dropped (%d bytes)", replyLen(got), replyLen(head))
	}
}

// TestAnswerTLSRPTOverflow: a policy of 64 KiB of short mx lines has more
// mx_host_pattern attributes than a reply holds. Rather than a reply the
// socketmap server would turn into TEMP (deferring mail over a remote
// domain's policy, SPEC 1.3), the answer drops every TLSRPT attribute and
// stays the plain answer, which always fits (SPEC 1.4).
func TestAnswerTLSRPTOverflow(t *testing.T) {
	var mx, lines []string
	size := 0
	for i := 0; ; i++ {
		host := fmt.Sprintf("m%d.example", i)
		line := "mx: " + host
		if size+len(line)+2 > resolver.MaxPolicySize {
			break
		}
		size += len(line) + 2
		mx, lines = append(mx, host), append(lines, line)
	}
	p := stsPolicy(resolver.ModeEnforce, mx, lines...)
	withPatterns := len(" policy_type=sts policy_domain=example.com") + len(mx)*len(" mx_host_pattern=")
	plain, _ := Answer("example.com", p, sni)
	if replyLen(plain)+withPatterns < socketmap.DefaultMaxReplySize {
		t.Fatalf("%d mx with their mx_host_pattern fit; the test needs a policy whose patterns do not", len(mx))
	}
	got, ok := Answer("example.com", p, tlsrpt)
	if !ok {
		t.Fatal("got NOTFOUND")
	}
	if got != plain {
		t.Errorf("overflowing TLSRPT answer: got %d bytes (%q...), want the plain answer of %d bytes", len(got), got[:min(len(got), 80)], len(plain))
	}
	if replyLen(got) >= socketmap.DefaultMaxReplySize {
		t.Errorf("reply of %d bytes does not fit", replyLen(got))
	}
}

// TestAnswerFits checks the arithmetic against the socketmap encoder.
func TestAnswerFits(t *testing.T) {
	limit := socketmap.DefaultMaxReplySize
	for _, n := range []int{0, 1, 6, 7, 96, 97, 996, 997, 9996, 9997, limit - 12, limit - 11, limit - 10, limit - 9, limit - 8, limit} {
		want := replyLen(strings.Repeat("x", n)) < limit
		if got := answerFits(n); got != want {
			t.Errorf("answerFits(%d) = %v, want %v", n, got, want)
		}
	}
}

func replyLen(answer string) int {
	return len(socketmap.AppendReply(nil, socketmap.OK(answer)))
}

func FuzzTLSRPTAnswer(f *testing.F) {
	f.Add(uint8(0), uint8(0), "mx1.example.com\n*.example.net", "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400")
	f.Add(uint8(1), uint8(1), "mx1.example.com", "x } policy_type=evil {\n} mx_host_pattern=evil.example {")
	f.Add(uint8(2), uint8(2), "*.example.net\nhostname\n*", "{ policy_string = a }, { policy_string = b }\n\t\r\x00\x7f{}")
	f.Add(uint8(1), uint8(3), "MX1.EXAMPLE.COM\nmx1.example.com\n*.EXAMPLE.net", "caf\xc3\xa9 \xff\xe2\x82 \xc2\x85 ,,, == ")
	f.Add(uint8(8), uint8(1), "mx1.example.com:evil.example\nmx2.example.com servername=evil", "mode: testing\r\n\r\n")
	f.Add(uint8(0), uint8(2), "a.b\nc.d", "k: \u2028\u00a0\ufeff \xed\xa0\x80 \xf4\x90\x80\x80 \xc0\xaf")
	f.Add(uint8(3), uint8(3), "mx1.example.com", "mode: enforce")
	f.Add(uint8(5), uint8(0), "mx1.example.com", "mode: enforce")
	domains := []string{"example.com", "EXAMPLE.com", "xn--bcher-kva.example", "", "exa mple.com", "evil.example policy_type=x", "bücher.example", "a}b{.example"}
	modes := []resolver.Mode{resolver.ModeEnforce, resolver.ModeTesting, resolver.ModeNone}
	f.Fuzz(func(t *testing.T, which, flags uint8, mx, text string) {
		domain := domains[int(which)%len(domains)]
		lines := append(strings.Split(text, "\n"), text)
		p := stsPolicy(modes[int(which)/len(domains)%len(modes)], strings.Split(mx, "\n"), lines...)
		s := Settings{StrictTesting: flags&1 != 0, Servername: flags&2 != 0, TLSRPT: true}
		got, ok := Answer(domain, p, s)
		s.TLSRPT = false
		base, baseOK := Answer(domain, p, s)
		if ok != baseOK || !strings.HasPrefix(got, base) {
			t.Fatalf("with TLSRPT %q, %v; without %q, %v: TLSRPT must only append", got, ok, base, baseOK)
		}
		if ok {
			s.TLSRPT = true
			checkTLSRPT(t, domain, p, s, got)
		}
	})
}

// checkTLSRPT checks a found answer as Postfix reads it: every attribute
// is one stsmap writes, each policy line is one policy_string of its own
// whatever it holds, and the reply fits Postfix's limit unless the
// mx_host_pattern attributes alone overflow it (SPEC 1.4, 7.3).
func checkTLSRPT(t *testing.T, domain string, p *resolver.Policy, s Settings, answer string) {
	t.Helper()
	for i, r := range answer {
		if r == utf8.RuneError && !strings.HasPrefix(answer[i:], "\uFFFD") || unicode.IsControl(r) {
			t.Fatalf("answer %q: invalid UTF-8 or a control character at byte %d", answer, i)
		}
	}
	checkBraces(t, answer)

	tokens := postfixTokens(answer)
	if len(tokens) < 2 || tokens[0] != "secure" || !strings.HasPrefix(tokens[1], "match=") {
		t.Fatalf("answer %q does not start with secure match=", answer)
	}
	match := strings.Split(strings.TrimPrefix(tokens[1], "match="), ":")
	var attrs []string // names in order
	var domains, patterns, strs []string
	for _, tok := range tokens[2:] {
		name, value, err := postfixAttribute(tok)
		if err != "" {
			t.Fatalf("answer %q: attribute %q: %s", answer, tok, err)
		}
		attrs = append(attrs, name)
		switch name {
		case "servername":
			if value != "hostname" {
				t.Fatalf("answer %q: servername=%q", answer, value)
			}
		case "policy_type":
			if value != "sts" {
				t.Fatalf("answer %q: policy_type=%q", answer, value)
			}
		case "policy_domain":
			domains = append(domains, value)
		case "mx_host_pattern":
			patterns = append(patterns, value)
		case "policy_string":
			strs = append(strs, value)
		default:
			t.Fatalf("answer %q: unexpected attribute %q", answer, name)
		}
	}

	// The attributes in their order, each policy_type and policy_domain
	// at most once.
	var want []string
	if s.Servername {
		want = append(want, "servername")
	}
	tlsrpt := s.TLSRPT && checkHostname(strings.ToLower(domain)) == nil
	if tlsrpt {
		want = append(want, "policy_type", "policy_domain")
		for range match {
			want = append(want, "mx_host_pattern")
		}
		for range strs {
			want = append(want, "policy_string")
		}
	}
	if !slices.Equal(attrs, want) {
		t.Fatalf("answer %q: attributes %q, want %q", answer, attrs, want)
	}
	if !tlsrpt {
		return
	}
	if domains[0] != strings.ToLower(domain) {
		t.Errorf("answer %q: policy_domain=%q, want %q", answer, domains[0], strings.ToLower(domain))
	}
	for i, pat := range patterns {
		if m := strings.Replace(pat, "*.", ".", 1); m != match[i] || strings.HasPrefix(match[i], ".") != strings.HasPrefix(pat, "*.") {
			t.Errorf("answer %q: mx_host_pattern=%q does not agree with match= pattern %q", answer, pat, match[i])
		}
	}

	// Each line is one policy_string, or none when empty after sanitising;
	// all of them go when they do not fit.
	var lines []string
	full := len(answer)
	for _, line := range p.Lines {
		if v := sanitize(line); v != "" {
			lines = append(lines, v)
			full += len(ps(v))
		}
	}
	switch {
	case slices.Equal(strs, lines):
	case len(strs) == 0:
		if answerFits(full) {
			t.Errorf("answer %q: policy_string attributes dropped from a reply that fits", answer)
		}
	default:
		t.Errorf("answer %q: policy_string values %q, want %q", answer, strs, lines)
	}
	if replyLen(answer) >= socketmap.DefaultMaxReplySize && len(strs) != 0 {
		t.Errorf("reply of %d bytes is too large and keeps its policy_string attributes", replyLen(answer))
	}
}

// sanitize is the policy_string value of line (SPEC 7.3), written
// independently of appendPolicyString.
func sanitize(line string) string {
	line = strings.ToValidUTF8(line, "")
	line = strings.Map(func(r rune) rune {
		if r == '{' || r == '}' || unicode.IsControl(r) {
			return -1
		}
		return r
	}, line)
	return strings.Trim(line, " ")
}

// checkBraces checks that every "{" opens " { policy_string = " and every
// "}" closes it as " }", with no nesting.
func checkBraces(t *testing.T, answer string) {
	t.Helper()
	open := false
	for i := 0; i < len(answer); i++ {
		switch answer[i] {
		case '{':
			if open || !strings.HasPrefix(answer[max(i-1, 0):], " { policy_string = ") {
				t.Fatalf("answer %q: stray { at byte %d", answer, i)
			}
			open = true
		case '}':
			if !open || answer[i-1] != ' ' || i+1 < len(answer) && answer[i+1] != ' ' {
				t.Fatalf("answer %q: stray } at byte %d", answer, i)
			}
			open = false
		}
	}
	if open {
		t.Fatalf("answer %q: unclosed {", answer)
	}
}

// postfixTokens splits an answer as Postfix's smtp_tls_policy_maps reader
// does (mystrtokq with CHARS_COMMA_SP and CHARS_BRACE): at commas and
// white space outside braces.
func postfixTokens(s string) []string {
	var tokens []string
	for i := 0; i < len(s); {
		if strings.IndexByte(", \t\r\n", s[i]) >= 0 {
			i++
			continue
		}
		start, level := i, 0
		for ; i < len(s); i++ {
			c := s[i]
			if c == '{' {
				level++
			} else if c == '}' && level > 0 {
				level--
			} else if level == 0 && strings.IndexByte(", \t\r\n", c) >= 0 {
				break
			}
		}
		tokens = append(tokens, s[start:i])
	}
	return tokens
}

// postfixAttribute reads one token as Postfix does: "{ name = value }"
// (extpar, then split_nameval) or "name=value".
func postfixAttribute(tok string) (name, value, err string) {
	if strings.HasPrefix(tok, "{") {
		if !strings.HasSuffix(tok, "}") {
			return "", "", "text after the closing brace"
		}
		tok = strings.Trim(tok[1:len(tok)-1], " \t\r\n")
	}
	name, value, found := strings.Cut(tok, "=")
	name, value = strings.TrimRight(name, " \t"), strings.TrimLeft(value, " \t")
	if !found || name == "" {
		return "", "", "not name=value"
	}
	return name, value, ""
}
