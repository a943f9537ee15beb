package policymap

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/net/idna"
)

// ErrSkip is wrapped by every error NormalizeKey returns: the key names no
// domain that can have an MTA-STS policy, and must be answered NOTFOUND at
// once, with no DNS, HTTPS or cache work (SPEC 2.4). SkipReason tells why.
var ErrSkip = errors.New("policymap: key has no MTA-STS policy domain")

// skipError carries a fixed reason: keys come from recipient addresses, so
// the error never repeats the key (SPEC 8.3).
type skipError struct {
	reason string
	msg    string
}

func (e *skipError) Error() string { return e.msg }
func (e *skipError) Unwrap() error { return ErrSkip }

func newSkipError(reason string) *skipError {
	return &skipError{reason: reason, msg: ErrSkip.Error() + ": " + reason}
}

// The rejections are allocated once, so that rejecting a key costs no
// allocation.
var (
	errEmpty        = newSkipError("empty")
	errParentDomain = newSkipError("parent_domain")
	errIPLiteral    = newSkipError("ip_literal")
	errPath         = newSkipError("path")
	errInvalidName  = newSkipError("invalid_name")
)

// SkipReason returns the reason NormalizeKey rejected a key, for logs and
// metrics: one of "empty", "parent_domain", "ip_literal", "path" and
// "invalid_name". It returns "" when err does not come from NormalizeKey.
func SkipReason(err error) string {
	if e, ok := errors.AsType[*skipError](err); ok {
		return e.reason
	}
	return ""
}

const (
	// maxNameLen is the longest host name in text form without the
	// trailing dot: 255 octets on the wire (RFC 1035 §2.3.4) less the
	// length octet of the first label and the root label.
	maxNameLen = 253
	// maxLabelLen is the longest label (RFC 1035 §2.3.4).
	maxLabelLen = 63
	// maxKeyLen bounds the work done on a key before it is rejected. No
	// valid key is longer: a name whose A-label form fits in 253 octets
	// has at most 253 code points, each at most 4 octets in UTF-8 (only
	// code points that UTS-46 ignores could pad it, and no real key holds
	// them), plus brackets, a trailing dot and a port.
	maxKeyLen = 4*maxNameLen + len("[].:65535")
)

// idnaProfile converts a name holding U-labels to A-labels (SPEC 2.2). It
// is spelled out rather than taken from idna.Lookup, whose configuration
// "may change over time", so that updating x/net cannot silently change
// cache keys. It is the lookup profile of RFC 5891 §5 as UTS-46 defines it:
//   - MapForLookup: the UTS-46 mapping (case folding, full-width forms,
//     NFC), the STD3 ASCII rules (letters, digits and hyphen only) and the
//     label checks of RFC 5891 §5.4 (hyphens, NFC, ContextJ for joiners,
//     valid code points, A-labels that decode to valid U-labels). Valid
//     means valid in UTS-46, which keeps some code points IDNA2008
//     disallows (symbols such as U+2603): browsers resolve those names,
//     so a mail domain may use them.
//   - Transitional(false): IDNA2008 ("faß.de" is xn--fa-hia.de, the name
//     its owner registered, not "fass.de" as IDNA2003 would map it).
//   - BidiRule: RFC 5893, for names with right-to-left labels.
//
// Lengths are left to checkHostname, which applies them to the A-label form
// that is actually looked up.
var idnaProfile = idna.New(idna.MapForLookup(), idna.Transitional(false), idna.BidiRule())

// NormalizeKey returns the policy domain for a Postfix smtp_tls_policy_maps
// lookup key: an A-label host name, lowercase, without a trailing dot. The
// key is the recipient domain or a next-hop as written in Postfix's
// configuration, which Postfix does not lowercase (SPEC 2.1).
//
// A key that has no policy domain (empty, a parent-domain probe, an IP
// literal, a path, or not a valid host name) yields an error wrapping
// ErrSkip (SPEC 2.4).
//
// An already-lowercase ASCII name costs no allocation: the result is then
// a substring of key.
func NormalizeKey(key string) (string, error) {
	n, err := ParseKey(key)
	return n.Domain, err
}

// Nexthop is a lookup key taken apart.
type Nexthop struct {
	Domain string // as NormalizeKey returns it
	// Port is the key's port, 25 when it has none.
	Port int
	// Bracketed is true for "[host]" and "[host]:port": Postfix connects
	// to the host itself, with no MX lookup.
	Bracketed bool
}

// ParseKey is NormalizeKey that also says how Postfix will reach the next
// hop (for DANE, SPEC 7.5).
func ParseKey(key string) (Nexthop, error) {
	key = trimSpace(key) // SPEC 2.2
	switch {
	case key == "":
		return Nexthop{}, errEmpty
	case len(key) > maxKeyLen:
		return Nexthop{}, errInvalidName
	case strings.IndexByte(key, '/') >= 0:
		// An LMTP socket path; Postfix leaves out the "unix:" prefix but
		// any "/" rules out a host name (SPEC 2.4).
		return Nexthop{}, errPath
	case key[0] == '.':
		// After a NOTFOUND Postfix tries ".example.com", then ".com".
		// RFC 8461 §3.4 forbids applying a parent domain's policy
		// (SPEC 2.4).
		return Nexthop{}, errParentDomain
	}
	host, port, err := hostOfKey(key)
	if err != nil {
		return Nexthop{}, err
	}
	domain, err := normalizeHost(host)
	if err != nil {
		return Nexthop{}, err
	}
	n := Nexthop{Domain: domain, Port: 25, Bracketed: key[0] == '['}
	if port != "" { // validPort checked it: digits only
		if p, _ := strconv.Atoi(port); p > 0 {
			n.Port = p
		}
	}
	return n, nil
}

// trimSpace removes ASCII spaces and tabs around s (SPEC 2.2). Unicode
// spaces are left for the host name check to reject.
func trimSpace(s string) string {
	for s != "" && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for s != "" && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// hostOfKey returns the host and port of "[host]", "[host]:port" and
// "host:port", and a plain name as it is (SPEC 2.3: the smart host's domain is the
// policy domain, RFC 8461 §3.4). IPv6 literals are rejected here, where
// their colons are still recognisable; IPv4 literals are rejected later, by
// checkHostname.
func hostOfKey(key string) (host, port string, err error) {
	if key[0] == '[' {
		end := strings.IndexByte(key, ']')
		if end < 0 {
			return "", "", errInvalidName
		}
		host, rest := key[1:end], key[end+1:]
		if rest != "" {
			var ok bool
			port, ok = strings.CutPrefix(rest, ":")
			if !ok || !validPort(port) {
				return "", "", errInvalidName
			}
		}
		if hasPrefixFold(host, "ipv6:") {
			return "", "", errIPLiteral // Postfix's "[ipv6:2001:db8::1]"
		}
		if strings.IndexByte(host, ':') >= 0 {
			return "", "", ipOrInvalid(host) // "[2001:db8::1]"
		}
		return host, port, nil
	}
	if hasPrefixFold(key, "ipv6:") {
		return "", "", errIPLiteral
	}
	colon := strings.IndexByte(key, ':')
	if colon < 0 {
		return key, "", nil
	}
	host, port = key[:colon], key[colon+1:]
	if strings.IndexByte(port, ':') >= 0 {
		return "", "", ipOrInvalid(key) // a bare IPv6 address
	}
	if !validPort(port) {
		return "", "", errInvalidName
	}
	return host, port, nil
}

// validPort reports whether s is a decimal TCP port. Postfix would also
// accept a service name ("[host]:submission"); such a key is rejected as an
// invalid name, so it gets no policy.
func validPort(s string) bool {
	if s == "" || len(s) > len("65535") {
		return false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + int(c-'0')
	}
	return n <= 65535
}

// hasPrefixFold is strings.HasPrefix ignoring ASCII case.
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// ipOrInvalid classifies a rejected name: an IP address is reported as such,
// anything else as an invalid name.
func ipOrInvalid(s string) error {
	if _, err := netip.ParseAddr(s); err == nil {
		return errIPLiteral
	}
	return errInvalidName
}

// normalizeHost lowercases host, strips one trailing dot and converts it to
// A-labels (SPEC 2.2), then checks that the result is a host name (SPEC
// 2.4).
func normalizeHost(host string) (string, error) {
	upper := false
	for i := 0; i < len(host); i++ {
		c := host[i]
		if c >= 0x80 {
			return normalizeIDN(host)
		}
		if 'A' <= c && c <= 'Z' {
			upper = true
		}
	}
	// Only one dot: "example.com." is the fully qualified form of
	// "example.com", but "example.com.." is no name at all.
	host = strings.TrimSuffix(host, ".")
	if upper {
		host = strings.ToLower(host)
	}
	if err := checkHostname(host); err != nil {
		return "", err
	}
	if err := checkALabels(host); err != nil {
		return "", err
	}
	return host, nil
}

// acePrefix starts every A-label (RFC 5890 §2.3.2.1).
const acePrefix = "xn--"

// checkALabels checks the A-labels of a lowercase ASCII host name, if it
// has any. They must be genuine: decodable to a valid U-label (RFC 5891
// §5.4) and in the one canonical form, so that a domain has one cache key.
func checkALabels(host string) error {
	if !strings.HasPrefix(host, acePrefix) && !strings.Contains(host, "."+acePrefix) {
		return nil
	}
	if _, ok := genuineALabelNames.Get(host); ok {
		return nil
	}
	if a, err := idnaProfile.ToASCII(host); err != nil || a != host {
		return errInvalidName
	}
	genuineALabelNames.Add(strings.Clone(host), struct{}{})
	return nil
}

// genuineALabelNames remembers the names with A-labels that checkALabels
// accepted, since the UTS-46 check costs more than the rest of a cached
// lookup. Only names that passed are kept, so a stream of bogus keys
// cannot push the good ones out, and the size bounds it either way.
var genuineALabelNames, _ = lru.New[string, struct{}](4096)

// normalizeIDN converts a host holding non-ASCII characters (SPEC 2.2). The
// trailing dot is stripped after the UTS-46 mapping, which also turns
// full stops such as U+3002 into ".", so that exactly one trailing dot of
// either kind is accepted.
func normalizeIDN(host string) (string, error) {
	// x/net/idna maps invalid UTF-8 to U+FFFD and encodes it without an
	// error; such a key is no name.
	if !utf8.ValidString(host) {
		return "", errInvalidName
	}
	a, err := idnaProfile.ToASCII(host)
	if err != nil {
		return "", errInvalidName
	}
	a = strings.TrimSuffix(a, ".")
	if err := checkHostname(a); err != nil {
		return "", err
	}
	// The result is checked as the A-labels of an ASCII key would be, so
	// that it is accepted again unchanged: the cache key of a U-label
	// name is the key of its A-label name.
	if err := checkALabels(a); err != nil {
		return "", err
	}
	return a, nil
}

// checkHostname reports whether s is a lowercase host name in its DNS text
// form (SPEC 2.4): at most 253 octets; labels of 1 to 63 letters, digits
// and hyphens, neither starting nor ending with a hyphen (RFC 952, RFC 1123
// §2.1); and a last label that is not all digits, since no top-level domain
// is (RFC 3696 §2), which also rules out IPv4 addresses and the shortened
// forms some resolvers read as addresses ("127.1").
//
// A single label ("localhost", "relay") is accepted: RFC 8461 does not
// forbid it and Postfix may be configured with a short relay name; its
// discovery costs one negatively cached DNS query (SPEC 6.6).
//
// Labels with "--" in the third and fourth positions other than A-labels
// ("r3---sn-abc") are accepted in ASCII names, which DNS allows; in a name
// that also holds U-labels or A-labels the IDNA rules reject them (RFC 5891
// §5.4), which this package does not second-guess.
//
// It serves both the key (a string) and the answer's patterns (bytes being
// appended).
func checkHostname[T string | []byte](s T) error {
	if len(s) == 0 || len(s) > maxNameLen {
		return errInvalidName
	}
	start, digits := 0, true
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == '.' {
			n := i - start
			if n == 0 || n > maxLabelLen || s[start] == '-' || s[i-1] == '-' {
				return errInvalidName
			}
			if i == len(s) && digits {
				return ipOrInvalid(string(s))
			}
			start, digits = i+1, true
			continue
		}
		switch c := s[i]; {
		case 'a' <= c && c <= 'z' || c == '-':
			digits = false
		case '0' <= c && c <= '9':
		default:
			return errInvalidName
		}
	}
	return nil
}
