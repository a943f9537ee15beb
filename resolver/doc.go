// Package resolver implements MTA-STS policy discovery as RFC 8461 describes
// it: the _mta-sts TXT record (§3.1, SPEC section 3), the HTTPS policy fetch
// (§3.3, SPEC section 4) and the policy parser (§3.2, SPEC section 5).
//
// It knows RFC 8461 and DNS, not Postfix: turning a policy into a Postfix
// answer is the job of package policymap, and caching it the job of package
// policycache.
package resolver
