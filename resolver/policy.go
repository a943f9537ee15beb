package resolver

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// The policy body (RFC 8461 §3.2, SPEC section 5):
//
//	sts-policy-record    = sts-policy-field *WSP
//	                       *(sts-policy-term sts-policy-field *WSP)
//	                       [sts-policy-term]
//	sts-policy-field     = version / mode / max_age / mx / extension
//	field-delim          = ":" *WSP
//	version value        = %s"STSv1"
//	mode value           = %s"testing" / %s"enforce" / %s"none"
//	max_age value        = 1*10(DIGIT)
//	mx value             = ["*."] Domain              ; Domain: RFC 5321 §4.1.2
//	sts-policy-ext-name  = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
//	sts-policy-ext-value = sts-policy-vchar *(*WSP sts-policy-vchar)
//	sts-policy-vchar     = %x21-7E / UTF8-2 / UTF8-3 / UTF8-4
//	sts-policy-term      = LF / CRLF
//
// Choices where the RFC leaves room, each applied at the line that
// implements it:
//   - An empty line before the last field is invalid: the ABNF puts exactly
//     one field after every sts-policy-term but the last.
//   - Trailing lines that are empty or hold only WSP are tolerated and left
//     out of Policy.Lines (SPEC 5.1, 5.6): they are invisible, and rejecting
//     them would turn the domain's policy off.
//   - Keys are case-sensitive (%s in the ABNF): "Mode: enforce" is an
//     unknown extension, so a policy with only that line has no mode.
//   - The first version, mode or max_age line must carry a valid value; a
//     repeat is ignored once it matches the generic line syntax (SPEC 5.4).
//     The ABNF would also read "mode: Enforce" as an extension; we do not,
//     because a mistyped required field must not be silently skipped.
//   - "max_age: 0" is valid (1*10DIGIT): the policy expires at once.
//   - Every mx line must be valid, also in mode none (SPEC 5.1: a malformed
//     line makes the policy invalid).
//   - An mx with a trailing dot is invalid: RFC 5321 Domain has none.
//   - An IP-literal mx, bare or in brackets, is dropped with a warning (SPEC
//     5.3); brackets around anything else make the policy invalid.
//   - An "xn--" label must be a valid A-label (validALabel).
//   - A body over MaxPolicySize is invalid, so Lines stay bounded (SPEC 8.3).

// Limits on what the parser keeps from a remote body (SPEC 8.3).
const (
	// maxPolicyWarnings bounds Policy.Warnings; the last slot says how
	// many more were dropped.
	maxPolicyWarnings = 5
	// maxPolicyQuote bounds the piece of a remote value quoted in an
	// error or warning, before escaping.
	maxPolicyQuote = 40
	// maxPolicyKeyLen: sts-policy-ext-name is one character plus up to 31.
	maxPolicyKeyLen = 32
	// maxPolicyMaxAgeDigits: max_age is 1*10DIGIT.
	maxPolicyMaxAgeDigits = 10
	// maxLDHNameLen and maxLDHLabelLen: RFC 1035 §2.3.4, as SPEC 2.4.
	maxLDHNameLen  = 253
	maxLDHLabelLen = 63
)

// policyError is a ParsePolicy error. It matches ErrInvalidPolicy and names
// the line (1-based; 0 when the fault is not on one line, like a missing
// field). reason holds no more than a short escaped quote of remote text.
type policyError struct {
	line   int
	reason string
}

func (e *policyError) Error() string { return ErrInvalidPolicy.Error() + ": " + e.detail() }

func (e *policyError) Unwrap() error { return ErrInvalidPolicy }

// detail is the error without the sentinel's text, for Fetch to put the
// policy host in front of it.
func (e *policyError) detail() string {
	if e.line == 0 {
		return e.reason
	}
	return "line " + strconv.Itoa(e.line) + ": " + e.reason
}

// ParsePolicy parses a policy body (RFC 8461 §3.2, SPEC section 5). Errors
// wrap ErrInvalidPolicy and say which line and why, quoting at most a short,
// escaped piece of the body (SPEC 8.3).
func ParsePolicy(body []byte) (*Policy, error) {
	if len(body) > MaxPolicySize {
		return nil, &policyError{reason: fmt.Sprintf("body of %d bytes is larger than %d", len(body), MaxPolicySize)}
	}
	lines := splitPolicyLines(string(body))
	if len(lines) == 0 {
		return nil, &policyError{reason: "empty policy"}
	}

	p := &Policy{Lines: lines}
	var (
		warn                           policyWarnings
		seenVersion, seenMode, seenAge bool
		ipLiterals                     int
		seenMX                         map[string]struct{}
	)
	for i, line := range lines {
		n := i + 1
		key, value, reason := splitPolicyLine(line)
		if reason != "" {
			return nil, &policyError{line: n, reason: reason}
		}
		switch key {
		case "version":
			if seenVersion {
				warn.add("line %d: repeated version ignored (the first counts)", n)
				continue
			}
			seenVersion = true
			// RFC 8461 §3.2: %s"STSv1", case-sensitive (SPEC 5.1, 5.2).
			if value != "STSv1" {
				return nil, &policyError{line: n, reason: "version " + policyQuote(value) + " is not STSv1"}
			}
		case "mode":
			if seenMode {
				warn.add("line %d: repeated mode ignored (the first counts)", n)
				continue
			}
			seenMode = true
			// RFC 8461 §3.2: case-sensitive, so "Enforce" is invalid.
			switch m := Mode(value); m {
			case ModeEnforce, ModeTesting, ModeNone:
				p.Mode = m
			default:
				return nil, &policyError{line: n, reason: "mode " + policyQuote(value) + " is not enforce, testing or none"}
			}
		case "max_age":
			if seenAge {
				warn.add("line %d: repeated max_age ignored (the first counts)", n)
				continue
			}
			seenAge = true
			secs, ok := parsePolicyMaxAge(value)
			if !ok {
				return nil, &policyError{line: n, reason: "max_age " + policyQuote(value) + " is not 1 to 10 digits"}
			}
			// SPEC 5.2 decision: cap at one year (RFC 8461 §3.2
			// recommends no more). Capping before converting also
			// keeps 9999999999 s from overflowing time.Duration.
			if limit := int64(MaxMaxAge / time.Second); secs > limit {
				warn.add("line %d: max_age %d capped at %d", n, secs, limit)
				secs = limit
			}
			p.MaxAge = time.Duration(secs) * time.Second
		case "mx":
			pattern, isIP, reason := parseMXPattern(value)
			switch {
			case reason != "":
				return nil, &policyError{line: n, reason: "mx " + policyQuote(value) + ": " + reason}
			case isIP:
				// SPEC 5.3: an IP literal is not a host name
				// pattern; drop it, keep the rest.
				ipLiterals++
				warn.add("line %d: mx %s is an IP literal, dropped", n, policyQuote(value))
				continue
			}
			// SPEC 5.3: lowercase (done by parseMXPattern), drop
			// duplicates, keep the policy's order.
			if _, dup := seenMX[pattern]; dup {
				continue
			}
			if seenMX == nil {
				seenMX = make(map[string]struct{})
			}
			seenMX[pattern] = struct{}{}
			p.MX = append(p.MX, pattern)
		}
		// Any other key is an extension: ignored (RFC 8461 §3.2, SPEC
		// 5.4), its syntax already checked by splitPolicyLine.
	}

	// SPEC 5.2: version, mode and max_age are required.
	switch {
	case !seenVersion:
		return nil, &policyError{reason: "missing version"}
	case !seenMode:
		return nil, &policyError{reason: "missing mode"}
	case !seenAge:
		return nil, &policyError{reason: "missing max_age"}
	}
	// SPEC 5.2, 5.3: at least one mx unless the mode is none, counted after
	// dropping IP literals.
	if p.Mode != ModeNone && len(p.MX) == 0 {
		if ipLiterals > 0 {
			return nil, &policyError{reason: fmt.Sprintf("no mx left for mode %s after dropping %d IP literals", p.Mode, ipLiterals)}
		}
		return nil, &policyError{reason: "no mx for mode " + string(p.Mode)}
	}
	p.Warnings = warn.list()
	return p, nil
}

// splitPolicyLines cuts body at LF or CRLF (RFC 8461 §3.2 sts-policy-term)
// and drops trailing blank lines (see the choices above). A CR not followed
// by LF stays in the line, where splitPolicyLine rejects it as a control
// character. The lines share body's memory.
func splitPolicyLines(body string) []string {
	lines := make([]string, 0, strings.Count(body, "\n")+1)
	for body != "" {
		line, rest, found := strings.Cut(body, "\n")
		if found {
			line = strings.TrimSuffix(line, "\r")
		}
		lines = append(lines, line)
		body = rest
	}
	for len(lines) > 0 && policyTrimWSP(lines[len(lines)-1]) == "" {
		lines = lines[:len(lines)-1]
	}
	return lines
}

// splitPolicyLine checks one line against the generic field syntax, key
// ":" *WSP value *WSP (RFC 8461 §3.2 sts-policy-ext-name, field-delim,
// sts-policy-ext-value), and returns the key and the value without the WSP
// around it. reason is empty when the line is well formed.
func splitPolicyLine(line string) (key, value, reason string) {
	if policyTrimWSP(line) == "" {
		return "", "", "empty line (allowed only at the end)"
	}
	colon := strings.IndexByte(line, ':')
	if colon < 0 {
		return "", "", `no ":" after the key`
	}
	key = line[:colon]
	if !policyKeyValid(key) {
		// SPEC 5.1: no space before ":".
		if k := policyTrimWSP(key); k != key && policyKeyValid(k) {
			return "", "", "space before \":\" after key " + policyQuote(k)
		}
		return "", "", "invalid key " + policyQuote(key)
	}
	value = policyTrimWSP(line[colon+1:])
	if value == "" {
		// sts-policy-ext-value and every known value have at least
		// one character.
		return "", "", "empty value for key " + policyQuote(key)
	}
	// sts-policy-vchar / WSP: no control characters (CR and DEL
	// included), valid UTF-8.
	for i := 0; i < len(value); i++ {
		if c := value[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return "", "", "control character in the value of " + policyQuote(key)
		}
	}
	if !utf8.ValidString(value) {
		return "", "", "value of " + policyQuote(key) + " is not valid UTF-8"
	}
	return key, value, ""
}

// policyKeyValid reports whether key matches sts-policy-ext-name (RFC 8461
// §3.2), which every known key also matches.
func policyKeyValid(key string) bool {
	if key == "" || len(key) > maxPolicyKeyLen || !isAlnum(key[0]) {
		return false
	}
	for i := 1; i < len(key); i++ {
		if !isExtNameChar(key[i]) {
			return false
		}
	}
	return true
}

// parsePolicyMaxAge parses 1*10DIGIT (RFC 8461 §3.2); ten digits always fit
// an int64.
func parsePolicyMaxAge(s string) (int64, bool) {
	if s == "" || len(s) > maxPolicyMaxAgeDigits {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(s[i]-'0')
	}
	return n, true
}

// parseMXPattern checks an mx value (RFC 8461 §3.2 sts-policy-mx-value,
// SPEC 5.3) and returns it lowercased. isIP reports an IP literal
// ("192.0.2.1", "2001:db8::1", "[192.0.2.1]", "[IPv6:2001:db8::1]"), which
// the caller drops. reason is empty when the value is a valid pattern.
func parseMXPattern(v string) (pattern string, isIP bool, reason string) {
	// IP literals first: "192.0.2.1" also has the syntax of a Domain.
	if len(v) >= 2 && v[0] == '[' && v[len(v)-1] == ']' {
		inner := v[1 : len(v)-1]
		if len(inner) > 5 && strings.EqualFold(inner[:5], "IPv6:") {
			inner = inner[5:]
		}
		if _, err := netip.ParseAddr(inner); err == nil {
			return "", true, ""
		}
		return "", false, "not a valid address literal"
	}
	if _, err := netip.ParseAddr(v); err == nil {
		return "", true, ""
	}
	for i := 0; i < len(v); i++ {
		if v[i] >= utf8.RuneSelf {
			// SPEC 5.3: mx must be in A-label form.
			return "", false, "non-ASCII (a U-label); mx must use A-labels"
		}
	}
	v = strings.ToLower(v)
	if len(v) > maxLDHNameLen {
		// The whole pattern: a host matching "*.name" is at least as
		// long, so a longer pattern could never match.
		return "", false, fmt.Sprintf("longer than %d characters", maxLDHNameLen)
	}
	host := strings.TrimPrefix(v, "*.")
	if strings.IndexByte(host, '*') >= 0 {
		// RFC 8461 §3.2 ["*."] Domain: a wildcard only as the whole
		// first label, followed by a host name.
		return "", false, `"*" is allowed only as "*." at the start`
	}
	if reason := checkLDHName(host); reason != "" {
		return "", false, reason
	}
	return v, false, ""
}

// checkLDHName checks a lowercase ASCII host name: RFC 5321 §4.1.2 Domain
// (LDH labels that start and end with a letter or digit, no trailing dot),
// labels of at most 63 octets, at most 253 in all, and every "xn--" label a
// valid A-label (RFC 5890 §2.3.2.1). It returns why the name is invalid, or
// "".
func checkLDHName(name string) string {
	if len(name) > maxLDHNameLen {
		return fmt.Sprintf("longer than %d characters", maxLDHNameLen)
	}
	for i := 0; i < len(name); i++ {
		if name[i] >= utf8.RuneSelf {
			return "non-ASCII character (A-labels only)"
		}
	}
	for label := range strings.SplitSeq(name, ".") {
		switch {
		case label == "":
			return "empty label"
		case len(label) > maxLDHLabelLen:
			return fmt.Sprintf("label longer than %d characters", maxLDHLabelLen)
		case !isAlnum(label[0]) || !isAlnum(label[len(label)-1]):
			return "label starts or ends with a character other than a letter or digit"
		}
		for i := 1; i < len(label)-1; i++ {
			if c := label[i]; !isAlnum(c) && c != '-' {
				return "character " + strconv.QuoteRuneToASCII(rune(c)) + " not allowed in a host name"
			}
		}
		if strings.HasPrefix(label, "xn--") && !validALabel(label) {
			return "label " + policyQuote(label) + " is not a valid A-label"
		}
	}
	return ""
}

// validALabel reports whether a lowercase "xn--" label is a valid A-label
// (RFC 5890 §2.3.2.1): it decodes to a valid U-label under UTS 46 lookup
// rules (the profile golang.org/x/net/idna calls Lookup, non-transitional)
// that encodes back to the same label. Each label is checked alone, so the
// Bidi rule (RFC 5893) does not judge one label by its neighbours.
func validALabel(label string) bool {
	u, err := idna.Lookup.ToUnicode(label)
	if err != nil || u == label {
		return false
	}
	a, err := idna.Lookup.ToASCII(u)
	return err == nil && a == label
}

// policyWarnings collects ParsePolicy's warnings, at most
// maxPolicyWarnings, each built from bounded parts (SPEC 8.3).
type policyWarnings struct {
	msgs    []string
	dropped int
}

func (w *policyWarnings) add(format string, args ...any) {
	if len(w.msgs) < maxPolicyWarnings {
		w.msgs = append(w.msgs, fmt.Sprintf(format, args...))
		return
	}
	w.dropped++
}

// list returns the warnings; when some were dropped, the last slot counts
// them instead, so the list never exceeds maxPolicyWarnings.
func (w *policyWarnings) list() []string {
	if w.dropped > 0 {
		w.msgs[len(w.msgs)-1] = fmt.Sprintf("%d more warnings not shown", w.dropped+1)
	}
	return w.msgs
}

// policyQuote quotes a remote value for an error or warning: escaped to
// printable ASCII and cut to maxPolicyQuote bytes first, with "..." when cut
// (SPEC 8.3).
func policyQuote(s string) string { return clipQuote(s, maxPolicyQuote) }

// policyTrimWSP trims WSP (SP and HTAB, RFC 5234) from both ends.
func policyTrimWSP(s string) string {
	return strings.Trim(s, " \t")
}
