// Package policymap is the one place where MTA-STS meets Postfix: it turns a
// Postfix smtp_tls_policy_maps lookup key into the domain whose MTA-STS
// policy applies (SPEC section 2), and a policy into the text Postfix reads
// after "OK " in a socketmap reply (SPEC 7.1 to 7.4), with a DANE level
// taking precedence where the domain has one (SPEC 7.5, package dane).
//
// NormalizeKey runs before any DNS, HTTPS or cache work: a key it rejects
// with ErrSkip is answered NOTFOUND at once (SPEC 2.4), and the domain it
// returns (an A-label, RFC 8461 §3.1 and §3.4) is the cache key. Answer and
// AppendAnswer write the "secure match=..." text, or report that the answer
// is NOTFOUND so that Postfix keeps its own default TLS level.
//
// Key normalisation and answers do no I/O. Handler ties them to the cache
// (package policycache), the DANE checker (package dane) and the socketmap
// reply words (package socketmap); how policies are discovered is package
// resolver's business.
package policymap
