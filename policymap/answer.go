package policymap

import (
	"bytes"
	"slices"

	"stsmap/resolver"
)

// Settings are the answer options a map name is configured with.
type Settings struct {
	// StrictTesting answers a policy in mode testing like one in mode
	// enforce (SPEC 7.2, decision).
	StrictTesting bool
	// Servername appends "servername=hostname", which Postfix accepts from
	// version 3.4 (SPEC 7.4).
	Servername bool
}

// The pieces of an answer (SPEC 7.1).
const (
	answerSecure     = "secure match="
	answerServername = " servername=hostname"
)

// maxLinearDedup is the number of mx patterns up to which duplicates are
// found by scanning the answer written so far, which needs no allocation.
// Longer lists, which only a policy near the 64 KiB limit has, use a map.
const maxLinearDedup = 32

// Answer returns the text Postfix reads after "OK " for policy p, or
// ok=false when the answer is NOTFOUND (SPEC 7.1, 7.2). It never returns
// ok=true with an empty text.
func Answer(p *resolver.Policy, s Settings) (text string, ok bool) {
	b, ok := AppendAnswer(nil, p, s)
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
// Postfix checks the patterns against the names in the MX host's
// certificate (smtp_tls_secure_cert_match), and "servername=hostname" sends
// the MX host name as SNI. Two differences from RFC 8461 §4.1 are known:
// Postfix does not match the MX host name itself against the patterns, and
// its ".example.net" accepts subdomains at any depth where MTA-STS's
// "*.example.net" accepts one label only ("a.b.example.net" matches the
// former, not the latter). The Postfix 3.10 TLSRPT attributes (SPEC 7.3)
// will make Postfix match MX hosts exactly as §4.1 says.
func AppendAnswer(dst []byte, p *resolver.Policy, s Settings) ([]byte, bool) {
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
	dst = slices.Grow(dst, answerLen(p))
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
	if s.Servername {
		dst = append(dst, answerServername...) // SPEC 7.4
	}
	return dst, true
}

// answerLen is the longest answer p can have, so that AppendAnswer grows
// dst at most once.
func answerLen(p *resolver.Policy) int {
	n := len(answerSecure) + len(answerServername)
	for _, mx := range p.MX {
		n += len(mx) + len(":")
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
	for i := 0; i < len(mx); i++ {
		c := mx[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
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
