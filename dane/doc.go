// Package dane tells whether a next hop is protected by DANE for SMTP (RFC
// 7672), so that an MTA-STS answer never overrides DANE: RFC 8461 §2 says
// MTA-STS MUST NOT override a failing DANE validation, and in Postfix a
// `secure` answer from smtp_tls_policy_maps replaces a global `dane` level
// (SPEC 7.5). A Checker finds the next hop's MX hosts and their TLSA
// records through the configured resolver and answers a Level: the caller
// answers `dane-only` or `dane` instead of `secure` for a domain that has
// DANE.
//
// Trust is the AD bit of the configured validating resolver, the same trust
// Postfix's own DANE support uses: an MX RRset or TLSA RRset without AD is
// treated as absent (RFC 7672 §2.2: insecure records are not used). With a
// resolver that never validates, no domain has DANE and each domain costs
// one MX query per TTL.
//
// Results are cached for the TTL of the records used, clamped to
// [Config.MinTTL, Config.MaxTTL], and refreshed in the background when used
// in the last quarter of their lifetime, so a domain in use waits for DANE
// only on its first check.
//
// The package knows DNS and RFC 7672, not Postfix's answer syntax: the
// translation of a Level into a policy answer is package policymap's job.
package dane
