package resolver

import (
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// familyAnswer is what the test DNS server answers for one address family
// of the policy host: addresses, or "SERVFAIL", or nothing (NODATA).
type familyAnswer []string

// serveFamilies answers A and AAAA queries for the policy host from a and
// aaaa; a query of a family whose release is not nil waits for it to be
// closed, then gets no reply.
func serveFamilies(s *testDNSServer, a, aaaa familyAnswer, holdAAAA chan struct{}) {
	s.SetHandler(testFetchHost, func(req *dns.Msg) *dns.Msg {
		m := new(dns.Msg).SetReply(req)
		ans := a
		if req.Question[0].Qtype == dns.TypeAAAA {
			if holdAAAA != nil {
				<-holdAAAA
				return nil
			}
			ans = aaaa
		}
		for _, v := range ans {
			if v == "SERVFAIL" {
				m.Rcode = dns.RcodeServerFailure
				return m
			}
			ip := net.ParseIP(v)
			hdr := dns.RR_Header{Name: req.Question[0].Name, Class: dns.ClassINET, Ttl: 300, Rrtype: req.Question[0].Qtype}
			if req.Question[0].Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: ip.To4()})
			} else {
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: ip.To16()})
			}
		}
		return m
	})
}

// Through the configured DNS (a familyResolver), the fetch tries the IPv4
// addresses first, the IPv6 ones when none answers, and tells DNS
// failures from connect failures as LookupHost's callers do.
func TestFetchAddressFamilies(t *testing.T) {
	// The test dialer accepts only 192.0.2.10:443; an IPv4-mapped AAAA
	// reaches it too.
	good, refused, mapped := testFetchAddr.String(), "192.0.2.1", "::ffff:"+testFetchAddr.String()
	tests := []struct {
		name       string
		a, aaaa    familyAnswer
		wantDialed []string
		wantClass  string // "" for success
		wantText   string
	}{
		{name: "IPv4", a: familyAnswer{good}, wantDialed: []string{"192.0.2.10:443"}},
		{name: "IPv4 refused, IPv6 answers", a: familyAnswer{refused}, aaaa: familyAnswer{mapped},
			wantDialed: []string{"192.0.2.1:443", "192.0.2.10:443"}},
		{name: "IPv6 only", aaaa: familyAnswer{mapped}, wantDialed: []string{"192.0.2.10:443"}},
		{name: "A lookup failed, IPv6 answers", a: familyAnswer{"SERVFAIL"}, aaaa: familyAnswer{mapped},
			wantDialed: []string{"192.0.2.10:443"}},
		{name: "no address", wantClass: "dns", wantText: "no A or AAAA record"},
		{name: "A lookup failed, no AAAA", a: familyAnswer{"SERVFAIL"}, wantClass: "dns", wantText: "SERVFAIL"},
		{name: "every address refused", a: familyAnswer{refused, "192.0.2.2"}, aaaa: familyAnswer{"2001:db8::1"},
			wantDialed: []string{"192.0.2.1:443", "192.0.2.2:443", "[2001:db8::1]:443"},
			wantClass:  "connect", wantText: "3 addresses, none answered; last: test dialer: refused tcp [2001:db8::1]:443"},
		{name: "IPv4 refused, AAAA lookup failed", a: familyAnswer{refused}, aaaa: familyAnswer{"SERVFAIL"},
			wantDialed: []string{"192.0.2.1:443"}, wantClass: "connect", wantText: "test dialer: refused tcp 192.0.2.1:443"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newTestDNSServer(t)
			serveFamilies(s, tc.a, tc.aaaa, nil)
			ft := newFetchTest(t, servePolicy("text/plain", testPolicy), testFetchCerts(t).good, nil)
			ft.fetcher.Hosts = newTestDNS(testQueryTimeout, s)
			p, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
			wantFetchOutcome(t, ft, p, err, tc.wantClass, tc.wantText, tc.wantDialed)
		})
	}
}

// A policy host whose AAAA query is never answered (some resolvers and
// middleboxes drop them) is fetched from its IPv4 address without waiting
// out the DNS timeout.
func TestFetchDoesNotWaitForAAAA(t *testing.T) {
	s := newTestDNSServer(t)
	hold := make(chan struct{})
	defer close(hold)
	serveFamilies(s, familyAnswer{testFetchAddr.String()}, nil, hold)
	ft := newFetchTest(t, servePolicy("text/plain", testPolicy), testFetchCerts(t).good, nil)
	ft.fetcher.Hosts = newTestDNS(time.Hour, s)
	done := make(chan error, 1)
	go func() {
		_, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Fetch: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the fetch is waiting for the AAAA answer")
	}
}
