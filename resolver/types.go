package resolver

import (
	"errors"
	"time"
)

// Errors returned by discovery, classified with errors.Is. Each is wrapped
// with details that are safe to log (bounded in length).
var (
	// ErrNoRecord: the _mta-sts TXT name does not exist or has no TXT
	// records (NXDOMAIN or NODATA), or none of them is an STSv1 record.
	// The domain has no MTA-STS policy (SPEC 3.4). LookupMX and
	// LookupTLSA return it too, for a name without records of the type.
	ErrNoRecord = errors.New("resolver: no MTA-STS record")
	// ErrInvalidRecord: STSv1 records exist but not exactly one valid one
	// (SPEC 3.2, 3.3).
	ErrInvalidRecord = errors.New("resolver: invalid MTA-STS record")
	// ErrDNS: the lookup failed (SERVFAIL, REFUSED, timeout, network
	// error, malformed answer). Discovery failed; it says nothing about
	// whether the domain has a policy (SPEC 3.4).
	ErrDNS = errors.New("resolver: DNS lookup failed")
	// ErrFetch: the HTTPS fetch failed: connection, TLS, status, redirect,
	// content type or size (SPEC section 4).
	ErrFetch = errors.New("resolver: policy fetch failed")
	// ErrInvalidPolicy: the policy body was fetched but does not parse
	// (SPEC section 5). It counts as a fetch failure (SPEC 5.5).
	ErrInvalidPolicy = errors.New("resolver: invalid MTA-STS policy")
)

// Record is a parsed _mta-sts TXT record (RFC 8461 §3.1).
type Record struct {
	// ID identifies the policy version; compared only for equality
	// (SPEC 3.3).
	ID string
}

// Mode is a policy's mode (RFC 8461 §5).
type Mode string

const (
	ModeEnforce Mode = "enforce"
	ModeTesting Mode = "testing"
	ModeNone    Mode = "none"
)

// MaxMaxAge caps a policy's max_age (SPEC 5.2, decision): one year, as RFC
// 8461 §3.2 recommends as the largest value.
const MaxMaxAge = 31557600 * time.Second

// MaxPolicySize is the largest policy body accepted (SPEC 4.5).
const MaxPolicySize = 64 * 1024

// Policy is a parsed MTA-STS policy (RFC 8461 §3.2).
type Policy struct {
	Mode Mode
	// MaxAge is already capped at MaxMaxAge.
	MaxAge time.Duration
	// MX holds the mx patterns in the policy's order: lowercased,
	// deduplicated, A-labels, IP literals dropped (SPEC 5.3). A pattern
	// is a host name or "*." followed by a host name.
	MX []string
	// Lines are the policy's lines as fetched, without line endings and
	// without trailing empty lines (SPEC 5.6, for TLSRPT).
	Lines []string
	// Warnings are notes on what the parser dropped (an IP-literal mx,
	// for example), bounded in number and length; for logs only.
	Warnings []string
}

// Answer is what a lookup learned about a DNS answer beyond its data.
type Answer struct {
	// Authentic: the configured resolver set the AD bit (DNSSEC-validated
	// data, RFC 4035 §3.2.3) on every reply that gave part of the answer.
	Authentic bool
	// TTL is the smallest TTL of the RRsets that gave the data (the CNAMEs
	// followed included); for a denial, the negative TTL (RFC 2308 §5),
	// 0 when the reply did not carry it.
	TTL time.Duration
}
