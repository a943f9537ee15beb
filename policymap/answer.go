package policymap

import (
	"bytes"
	"slices"
	"unicode"
	"unicode/utf8"

	"stsmap/resolver"
	"stsmap/socketmap"
)

// Settings are the answer options a map name is configured with.
type Settings struct {
	// StrictTesting answers a policy in mode testing like one in mode
	// enforce (SPEC 7.2, decision).
	StrictTesting bool
	// Servername appends "servername=hostname", which Postfix accepts from
	// version 3.4 (SPEC 7.4).
	Servername bool
	// TLSRPT appends the TLSRPT attributes, which Postfix accepts from
	// version 3.10; older versions defer all mail on them (SPEC 7.3).
	TLSRPT bool
}

// The pieces of an answer (SPEC 7.1, 7.3, 7.4).
const (
	answerSecure        = "secure match="
	answerServername    = " servername=hostname"
	answerPolicyType    = " policy_type=sts policy_domain="
	answerMXHostPattern = " mx_host_pattern="
	answerPolicyString  = " { policy_string = "
	answerPolicyEnd     = " }"
)

// replyPrefix is what the socketmap reply carries before the answer.
const replyPrefix = string(socketmap.WordOK) + " "

// maxLinearDedup is the number of mx patterns up to which duplicates are
// found by scanning the answer written so far, which needs no allocation.
// Longer lists, which only a policy near the 64 KiB limit has, use a map.
const maxLinearDedup = 32

// Answer returns the text Postfix reads after "OK " for the policy p of
// domain, or ok=false when the answer is NOTFOUND (SPEC 7.1, 7.2, 7.3). It
// never returns ok=true with an empty text.
func Answer(domain string, p *resolver.Policy, s Settings) (text string, ok bool) {
	b, ok := AppendAnswer(nil, domain, p, s)
	return string(b), ok
}

// AppendAnswer is Answer appending the text to dst; with a dst of enough
// capacity it does not allocate. When the answer is NOTFOUND it returns dst
// as it was and false.
//
// A policy in mode enforce (or testing, with s.StrictTesting) is answered
// "secure match=P1:P2:..." with its mx patterns in the policy's order,
// lowercased and without duplicates, each "*.example.net" written as
// Postfix's ".example.net" (SPEC 7.1). A pattern that is not a host name,
// optionally after "*.", is left out, since the text goes to Postfix
// verbatim and must not carry a ":", a space or a bare "*"; so is a pattern
// Postfix would read as one of its keywords. When no pattern is left, the
// answer is NOTFOUND rather than an empty "match=".
//
// With s.TLSRPT the TLSRPT attributes of Postfix 3.10 follow (SPEC 7.3,
// Postfix TLSRPT_README): "policy_type=sts policy_domain=DOMAIN", one
// "mx_host_pattern=P" for each pattern of match=, written as published
// ("*.example.net"), and one "{ policy_string = LINE }" for each line of
// the policy. A line loses its "{" and "}", which would end the braces
// early, and its control characters and invalid UTF-8, which have no place
// in a reply; a line left empty is skipped. When the reply would not fit
// Postfix's limit, the policy_string attributes are left out (SPEC 1.4); if
// it still does not fit, all TLSRPT attributes are. When domain is
// not a host name, Postfix would refuse policy_domain, so no TLSRPT
// attribute is written.
//
// Postfix checks the patterns against the names in the MX host's
// certificate (smtp_tls_secure_cert_match), and "servername=hostname" sends
// the MX host name as SNI. Two differences from RFC 8461 §4.1 are known:
// Postfix does not match the MX host name itself against the patterns, and
// its ".example.net" accepts subdomains at any depth where MTA-STS's
// "*.example.net" accepts one label only ("a.b.example.net" matches the
// former, not the latter). Postfix 3.10.5 and newer close both gaps when
// the answer carries mx_host_pattern (smtp_tls_enforce_sts_mx_patterns):
// they connect only to MX hosts whose name matches a pattern as §4.1 says,
// and match the certificate against that name.
func AppendAnswer(dst []byte, domain string, p *resolver.Policy, s Settings) ([]byte, bool) {
	if p == nil {
		return dst, false
	}
	switch p.Mode {
	case resolver.ModeEnforce:
	case resolver.ModeTesting:
		if !s.StrictTesting {
			return dst, false // SPEC 7.2: Postfix keeps its own level
		}
	default:
		return dst, false // none, and any mode this code does not know
	}

	orig := dst
	dst = slices.Grow(dst, answerLen(domain, p, s))
	start := len(dst)
	dst = append(dst, answerSecure...)
	first := len(dst)
	var seen map[string]struct{}
	if len(p.MX) > maxLinearDedup {
		seen = make(map[string]struct{}, len(p.MX))
	}
	for _, mx := range p.MX {
		mark := len(dst)
		if mark > first {
			dst = append(dst, ':')
		}
		patStart := len(dst)
		var ok bool
		dst, ok = appendPattern(dst, mx)
		pat := dst[patStart:]
		if !ok || isDuplicate(seen, dst[first:mark], pat) {
			dst = dst[:mark]
			continue
		}
		if seen != nil {
			seen[string(pat)] = struct{}{}
		}
	}
	if len(dst) == first {
		return orig, false // SPEC 7.1: never an empty match=
	}
	last := len(dst)
	if s.Servername {
		dst = append(dst, answerServername...) // SPEC 7.4
	}
	if s.TLSRPT {
		dst = appendTLSRPT(dst, start, first, last, domain, p.Lines)
	}
	return dst, true
}

// appendTLSRPT appends the TLSRPT attributes (SPEC 7.3) to an answer that
// begins at dst[start] and has its match= list in dst[first:last].
func appendTLSRPT(dst []byte, start, first, last int, domain string, lines []string) []byte {
	plain := len(dst)
	mark := len(dst)
	dst = append(dst, answerPolicyType...)
	name := len(dst)
	dst = appendLower(dst, domain)
	if checkHostname(dst[name:]) != nil {
		return dst[:mark]
	}
	// The patterns of match=, already checked and deduplicated, with
	// Postfix's ".example.net" written back as the policy's
	// "*.example.net".
	for i := first; i < last; {
		end := bytes.IndexByte(dst[i:last], ':')
		if end < 0 {
			end = last
		} else {
			end += i
		}
		dst = append(dst, answerMXHostPattern...)
		if dst[i] == '.' {
			dst = append(dst, '*')
		}
		dst = append(dst, dst[i:end]...)
		i = end + 1
	}
	mark = len(dst)
	for _, line := range lines {
		dst = appendPolicyString(dst, line)
	}
	if !answerFits(len(dst) - start) {
		dst = dst[:mark] // SPEC 1.4: optional attributes go first
	}
	if !answerFits(len(dst) - start) {
		// Thousands of mx patterns: rather the plain answer, which always
		// fits, than TEMP, which would defer mail over a remote domain's
		// policy (SPEC 1.3).
		dst = dst[:plain]
	}
	return dst
}

// appendPolicyString appends line as "{ policy_string = line }" without
// the bytes that could end the braces early or break the reply: "{", "}",
// control characters and invalid UTF-8. Postfix reads the braces as one
// attribute whatever else they hold (TLSRPT_README). Surrounding spaces are
// trimmed; a line left empty appends nothing.
func appendPolicyString(dst []byte, line string) []byte {
	mark := len(dst)
	dst = append(dst, answerPolicyString...)
	value := len(dst)
	for i := 0; i < len(line); {
		c := line[i]
		if c < utf8.RuneSelf {
			i++
			if c < ' ' || c == 0x7f || c == '{' || c == '}' || (c == ' ' && len(dst) == value) {
				continue // a leading space is trimmed here, trailing ones below
			}
			dst = append(dst, c)
			continue
		}
		r, size := utf8.DecodeRuneInString(line[i:])
		if !(r == utf8.RuneError && size == 1) && !unicode.IsControl(r) {
			dst = append(dst, line[i:i+size]...)
		}
		i += size
	}
	for len(dst) > value && dst[len(dst)-1] == ' ' {
		dst = dst[:len(dst)-1]
	}
	if len(dst) == value {
		return dst[:mark]
	}
	return append(dst, answerPolicyEnd...)
}

// answerFits reports whether an answer of n bytes fits in a socketmap
// reply: "OK " and the answer as one netstring must be shorter than
// Postfix's reply limit (SPEC 1.4).
func answerFits(n int) bool {
	payload := len(replyPrefix) + n
	size := len(":") + payload + len(",")
	for m := payload; m > 0; m /= 10 {
		size++ // a digit of the length
	}
	return size < socketmap.DefaultMaxReplySize
}

// answerLen is the longest answer p can have, so that AppendAnswer grows
// dst at most once.
func answerLen(domain string, p *resolver.Policy, s Settings) int {
	n := len(answerSecure) + len(answerServername)
	for _, mx := range p.MX {
		n += len(":") + len(mx)
	}
	if !s.TLSRPT {
		return n
	}
	n += len(answerPolicyType) + len(domain)
	for _, mx := range p.MX {
		n += len(answerMXHostPattern) + len(mx)
	}
	for _, line := range p.Lines {
		n += len(answerPolicyString) + len(line) + len(answerPolicyEnd)
	}
	return n
}

// appendPattern appends mx in Postfix's form: lowercase, with "*." written
// as "." (SPEC 7.1). It reports false when mx is not a host name or "*."
// followed by one; the parser already rejects those (SPEC 5.3), but this is
// the text Postfix reads, so it is checked where it is written. The caller
// truncates dst on false.
func appendPattern(dst []byte, mx string) ([]byte, bool) {
	wildcard := len(mx) >= 2 && mx[0] == '*' && mx[1] == '.'
	if wildcard {
		dst = append(dst, '.')
		mx = mx[2:]
	}
	host := len(dst)
	dst = appendLower(dst, mx)
	name := dst[host:]
	if checkHostname(name) != nil {
		return dst, false
	}
	// Postfix reads these words in a match list as "the MX host's own
	// name" and "the next-hop domain" (postconf(5),
	// smtp_tls_secure_cert_match), which would accept any MX host with a
	// certificate for its own name. As single-label mx patterns they
	// name no real MX host anyway.
	if !wildcard && (string(name) == "hostname" || string(name) == "nexthop" || string(name) == "dot-nexthop") {
		return dst, false
	}
	return dst, true
}

// appendLower appends s with its ASCII letters in lowercase.
func appendLower(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}

// isDuplicate reports whether pat was already written to list, the
// colon-separated patterns so far, or to seen when the list is long.
func isDuplicate(seen map[string]struct{}, list, pat []byte) bool {
	if seen != nil {
		_, ok := seen[string(pat)]
		return ok
	}
	for len(list) > 0 {
		cur := list
		if i := bytes.IndexByte(list, ':'); i >= 0 {
			cur, list = list[:i], list[i+1:]
		} else {
			list = nil
		}
		if bytes.Equal(cur, pat) {
			return true
		}
	}
	return false
}
