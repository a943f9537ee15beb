package resolver

import (
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"slices"
	"strings"

	"github.com/miekg/dns"
)

// The lookups in this file serve DANE (RFC 7672), which package dane
// checks so that an MTA-STS answer never overrides it (RFC 8461 §2, SPEC
// 7.5). They go through the same resolver, with the same DNSSEC flags, as
// MTA-STS discovery: the AD bit is the trust Postfix itself uses.

// TLSA is one TLSA record (RFC 6698 §2.1).
type TLSA struct {
	Usage, Selector, MatchingType uint8
	// Data is the certificate association data.
	Data []byte
}

// LookupMX returns the MX host names of domain (an A-label without the
// trailing dot) in preference order, lowercased, without the trailing dot
// and without duplicates, following CNAMEs at domain. Hosts of equal
// preference keep the order of the answer.
//
//   - NXDOMAIN: an error wrapping ErrNoRecord.
//   - NODATA: nil hosts and no error; the caller applies the implicit MX
//     (RFC 5321 §5.1). The Answer tells whether the denial was validated.
//   - A null MX (RFC 7505 §3: one MX RR with the target "."): an empty,
//     non-nil slice. "." among other MX RRs (which RFC 7505 forbids) is
//     dropped, and the other hosts are returned.
//   - Any failure to get an answer (SERVFAIL, timeout, ...): ErrDNS.
func (d *DNS) LookupMX(ctx context.Context, domain string) ([]string, Answer, error) {
	rrs, ans, err := d.lookup(ctx, domain, dns.TypeMX)
	if errors.Is(err, errNoData) {
		return nil, ans, nil
	}
	if err != nil {
		return nil, ans, err
	}
	mxs := make([]*dns.MX, len(rrs))
	for i, rr := range rrs {
		mxs[i] = rr.(*dns.MX)
	}
	slices.SortStableFunc(mxs, func(a, b *dns.MX) int { return cmp.Compare(a.Preference, b.Preference) })
	hosts := make([]string, 0, len(mxs))
	seen := make(map[string]bool, len(mxs))
	for _, mx := range mxs {
		host := strings.ToLower(strings.TrimSuffix(mx.Mx, "."))
		if host == "" || seen[host] {
			continue
		}
		seen[host] = true
		hosts = append(hosts, host)
	}
	return hosts, ans, nil
}

// LookupTLSA returns the TLSA records at name, such as
// "_25._tcp.mx.example.com" (RFC 7672 §2.2.3), following CNAMEs at name.
// NXDOMAIN and NODATA are an error wrapping ErrNoRecord, returned with the
// Answer of the denial (Authentic: the denial was validated). Any failure
// to get an answer (SERVFAIL, timeout, an invalid name, ...) wraps ErrDNS.
func (d *DNS) LookupTLSA(ctx context.Context, name string) ([]TLSA, Answer, error) {
	rrs, ans, err := d.lookup(ctx, name, dns.TypeTLSA)
	if err != nil {
		return nil, ans, err
	}
	records := make([]TLSA, 0, len(rrs))
	for _, rr := range rrs {
		t := rr.(*dns.TLSA)
		// miekg/dns unpacks the data as hex, so this cannot fail for a
		// record read off the wire.
		data, err := hex.DecodeString(t.Certificate)
		if err != nil {
			continue
		}
		records = append(records, TLSA{Usage: t.Usage, Selector: t.Selector, MatchingType: t.MatchingType, Data: data})
	}
	return records, ans, nil
}
