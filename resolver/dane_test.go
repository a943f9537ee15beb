package resolver

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testDigest is a SHA2-256 sized association data, in hex.
var testDigest = strings.Repeat("ab", 32)

func TestLookupMX(t *testing.T) {
	tests := []struct {
		name    string
		records []string
		rcode   int // forced for example.com when set
		want    []string
		wantNil bool // want is nil, not merely empty
		wantErr error
	}{
		{
			name: "preference order, lowercased, deduplicated",
			records: []string{
				`example.com. 300 IN MX 20 b.example.net.`,
				`example.com. 300 IN MX 10 A.Example.NET.`,
				`example.com. 300 IN MX 10 c.example.net.`,
				`example.com. 300 IN MX 30 a.example.net.`,
			},
			want: []string{"a.example.net", "c.example.net", "b.example.net"},
		},
		{
			name: "CNAME at the domain followed",
			records: []string{
				`example.com. 300 IN CNAME mail.example.net.`,
				`mail.example.net. 300 IN MX 10 mx.example.net.`,
			},
			want: []string{"mx.example.net"},
		},
		{
			name:    "NXDOMAIN",
			records: []string{`example.net. 300 IN MX 10 mx.example.net.`},
			wantErr: ErrNoRecord,
		},
		{
			name:    "NODATA: implicit MX left to the caller",
			records: []string{`example.com. 300 IN A 192.0.2.1`},
			wantNil: true,
		},
		{
			name:    "NODATA at the end of a CNAME chain",
			records: []string{`example.com. 300 IN CNAME t.example.net.`, `t.example.net. 300 IN A 192.0.2.1`},
			wantNil: true,
		},
		{
			name:    "null MX",
			records: []string{`example.com. 300 IN MX 0 .`},
			want:    []string{},
		},
		{
			name:    "null MX among other MX RRs dropped",
			records: []string{`example.com. 300 IN MX 0 .`, `example.com. 300 IN MX 10 mx.example.net.`},
			want:    []string{"mx.example.net"},
		},
		{
			name:    "SERVFAIL",
			records: []string{`example.com. 300 IN MX 10 mx.example.net.`},
			rcode:   dns.RcodeServerFailure,
			wantErr: ErrDNS,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			s.Add(tt.records...)
			if tt.rcode != 0 {
				s.SetRcode("example.com", tt.rcode)
			}
			got, _, err := newTestDNS(testQueryTimeout, s).LookupMX(t.Context(), "example.com")
			wantLookupErr(t, err, tt.wantErr)
			if tt.wantErr != nil {
				return
			}
			if tt.wantNil {
				if got != nil {
					t.Fatalf("hosts = %q, want nil", got)
				}
				return
			}
			if got == nil || !slices.Equal(got, tt.want) {
				t.Fatalf("hosts = %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestLookupTLSA(t *testing.T) {
	const name = "_25._tcp.mx.example.com"
	digest := bytes.Repeat([]byte{0xab}, 32)
	tests := []struct {
		name    string
		records []string
		rcode   int
		want    []TLSA
		wantErr error
	}{
		{
			name: "records",
			records: []string{
				`_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 ` + testDigest,
				`_25._tcp.mx.example.com. 300 IN TLSA 2 0 0 0102030405`,
			},
			want: []TLSA{{3, 1, 1, digest}, {2, 0, 0, []byte{1, 2, 3, 4, 5}}},
		},
		{
			name: "CNAME at the TLSA name followed",
			records: []string{
				`_25._tcp.mx.example.com. 300 IN CNAME _25._tcp.mx.example.net.`,
				`_25._tcp.mx.example.net. 300 IN TLSA 3 1 1 ` + testDigest,
			},
			want: []TLSA{{3, 1, 1, digest}},
		},
		{
			name:    "NXDOMAIN",
			records: []string{`mx.example.com. 300 IN A 192.0.2.1`},
			wantErr: ErrNoRecord,
		},
		{
			name:    "NODATA",
			records: []string{`_25._tcp.mx.example.com. 300 IN TXT "x"`},
			wantErr: ErrNoRecord,
		},
		{
			name:    "SERVFAIL",
			records: []string{`_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 ` + testDigest},
			rcode:   dns.RcodeServerFailure,
			wantErr: ErrDNS,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			s.Add(tt.records...)
			if tt.rcode != 0 {
				s.SetRcode(name, tt.rcode)
			}
			got, _, err := newTestDNS(testQueryTimeout, s).LookupTLSA(t.Context(), name)
			wantLookupErr(t, err, tt.wantErr)
			if !slices.EqualFunc(got, tt.want, func(a, b TLSA) bool {
				return a.Usage == b.Usage && a.Selector == b.Selector && a.MatchingType == b.MatchingType && bytes.Equal(a.Data, b.Data)
			}) {
				t.Fatalf("records = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestLookupTLSAInvalidName: a name too long for DNS is ErrDNS, without a
// query.
func TestLookupTLSAInvalidName(t *testing.T) {
	s := newTestDNSServer(t)
	name := "_25._tcp." + strings.Repeat(strings.Repeat("a", 63)+".", 4) + "example"
	_, _, err := newTestDNS(testQueryTimeout, s).LookupTLSA(t.Context(), name)
	wantLookupErr(t, err, ErrDNS)
	if n := s.TotalQueries(); n != 0 {
		t.Fatalf("queries = %d, want 0", n)
	}
}

// soaReply answers with rcode and, in the authority section, an SOA whose
// TTL and MINIMUM field are given, as a recursive resolver answers a
// denial (RFC 2308 §3).
func soaReply(t *testing.T, rcode int, ttl, minimum int) func(req *dns.Msg) *dns.Msg {
	return func(req *dns.Msg) *dns.Msg {
		m := new(dns.Msg).SetReply(req)
		m.Rcode = rcode
		m.Ns = []dns.RR{mustRR(t, fmt.Sprintf("example.com. %d IN SOA ns.example.com. host.example.com. 1 7200 3600 1209600 %d", ttl, minimum))}
		return m
	}
}

func TestAnswerTTL(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, s *testDNSServer)
		lookup  func(d *DNS, t *testing.T) (Answer, error)
		want    time.Duration
		wantErr error
	}{
		{
			name:  "TXT",
			setup: func(t *testing.T, s *testDNSServer) { s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`) },
			lookup: func(d *DNS, t *testing.T) (Answer, error) {
				_, ans, err := d.LookupTXT(t.Context(), "_mta-sts.example.com")
				return ans, err
			},
			want: 300 * time.Second,
		},
		{
			name: "smallest TTL of an RRset",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`example.com. 300 IN MX 10 a.example.net.`, `example.com. 100 IN MX 20 b.example.net.`)
			},
			lookup: lookupMX,
			want:   100 * time.Second,
		},
		{
			name: "CNAME with a smaller TTL",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`example.com. 60 IN CNAME mail.example.net.`, `mail.example.net. 300 IN MX 10 mx.example.net.`)
			},
			lookup: lookupMX,
			want:   60 * time.Second,
		},
		{
			name: "CNAME queried separately",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`example.com. 60 IN CNAME mail.example.net.`, `mail.example.net. 300 IN MX 10 mx.example.net.`)
				s.SetNoChase("example.com")
			},
			lookup: lookupMX,
			want:   60 * time.Second,
		},
		{
			name: "TLSA",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_25._tcp.mx.example.com. 600 IN TLSA 3 1 1 ` + testDigest)
			},
			lookup: lookupTLSA,
			want:   600 * time.Second,
		},
		{
			name: "NXDOMAIN with SOA: the smaller of its TTL and MINIMUM",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler("_25._tcp.mx.example.com", soaReply(t, dns.RcodeNameError, 3600, 900))
			},
			lookup:  lookupTLSA,
			want:    900 * time.Second,
			wantErr: ErrNoRecord,
		},
		{
			name: "NODATA with SOA",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler("example.com", soaReply(t, dns.RcodeSuccess, 120, 900))
			},
			lookup: lookupMX,
			want:   120 * time.Second,
		},
		{
			name:    "denial without SOA",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`mx.example.com. 300 IN A 192.0.2.1`) },
			lookup:  lookupTLSA,
			want:    0,
			wantErr: ErrNoRecord,
		},
		{
			name: "TTL with the top bit set counts as 0",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_25._tcp.mx.example.com. 2147483648 IN TLSA 3 1 1 ` + testDigest)
			},
			lookup: lookupTLSA,
			want:   0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			tt.setup(t, s)
			ans, err := tt.lookup(newTestDNS(testQueryTimeout, s), t)
			wantLookupErr(t, err, tt.wantErr)
			if ans.TTL != tt.want {
				t.Fatalf("TTL = %v, want %v", ans.TTL, tt.want)
			}
		})
	}
}

func lookupMX(d *DNS, t *testing.T) (Answer, error) {
	_, ans, err := d.LookupMX(t.Context(), "example.com")
	return ans, err
}

func lookupTLSA(d *DNS, t *testing.T) (Answer, error) {
	_, ans, err := d.LookupTLSA(t.Context(), "_25._tcp.mx.example.com")
	return ans, err
}

// TestDANEAuthentic: Authentic reports the AD bit for data and for denials,
// which DANE needs to tell a validated "no TLSA" from an unvalidated one.
func TestDANEAuthentic(t *testing.T) {
	tests := []struct {
		name    string
		records []string
		ad      bool
		lookup  func(d *DNS, t *testing.T) (Answer, error)
		wantErr error
	}{
		{name: "MX", records: []string{`example.com. 300 IN MX 10 mx.example.net.`}, lookup: lookupMX},
		{name: "MX NODATA", records: []string{`example.com. 300 IN A 192.0.2.1`}, lookup: lookupMX},
		{name: "MX NXDOMAIN", records: []string{`example.net. 300 IN A 192.0.2.1`}, lookup: lookupMX, wantErr: ErrNoRecord},
		{name: "TLSA", records: []string{`_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 ` + testDigest}, lookup: lookupTLSA},
		{name: "TLSA NXDOMAIN", records: []string{`mx.example.com. 300 IN A 192.0.2.1`}, lookup: lookupTLSA, wantErr: ErrNoRecord},
	}
	for _, tt := range tests {
		for _, ad := range []bool{true, false} {
			t.Run(tt.name+"/AD="+map[bool]string{true: "1", false: "0"}[ad], func(t *testing.T) {
				s := newTestDNSServer(t)
				s.Add(tt.records...)
				s.SetAD(ad)
				ans, err := tt.lookup(newTestDNS(testQueryTimeout, s), t)
				wantLookupErr(t, err, tt.wantErr)
				if ans.Authentic != ad {
					t.Fatalf("Authentic = %v, want %v", ans.Authentic, ad)
				}
			})
		}
	}
}
