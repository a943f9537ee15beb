// Package policymap is the one place where MTA-STS meets Postfix: it turns a
// Postfix smtp_tls_policy_maps lookup key into the domain whose MTA-STS
// policy applies (SPEC section 2), and a policy into the text Postfix reads
// after "OK " in a socketmap reply (SPEC 7.1, 7.2 and 7.4).
//
// NormalizeKey runs before any DNS, HTTPS or cache work: a key it rejects
// with ErrSkip is answered NOTFOUND at once (SPEC 2.4), and the domain it
// returns (an A-label, RFC 8461 §3.1 and §3.4) is the cache key. Answer and
// AppendAnswer write the "secure match=..." text, or report that the answer
// is NOTFOUND so that Postfix keeps its own default TLS level.
//
// The package does no I/O. It knows neither the socketmap wire format
// (package socketmap) nor how policies are discovered (package resolver) or
// cached (package policycache).
package policymap
