package resolver

import (
	"context"
	"fmt"
)

// Resolver discovers MTA-STS policies: the TXT record through DNS, the
// policy through Fetcher (whose policy host is resolved through the same
// DNS, SPEC 4.1).
type Resolver struct {
	DNS     *DNS
	Fetcher *Fetcher
}

// LookupRecord finds the domain's single valid STSv1 record at
// _mta-sts.<domain> (SPEC 3.1 to 3.4). domain is an A-label without a
// trailing dot. Errors wrap ErrNoRecord, ErrInvalidRecord or ErrDNS.
func (r *Resolver) LookupRecord(ctx context.Context, domain string) (Record, error) {
	txts, _, err := r.DNS.LookupTXT(ctx, "_mta-sts."+domain)
	if err != nil {
		return Record{}, err
	}
	rec, err := SelectRecord(txts)
	if err != nil {
		return Record{}, fmt.Errorf("_mta-sts.%s: %w", domain, err)
	}
	return rec, nil
}

// FetchPolicy fetches and parses the domain's policy (SPEC 4, 5).
func (r *Resolver) FetchPolicy(ctx context.Context, domain string) (*Policy, error) {
	return r.Fetcher.Fetch(ctx, domain)
}
