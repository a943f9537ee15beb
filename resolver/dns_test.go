package resolver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testQueryTimeout is the per-attempt timeout of test lookups that are
// expected to get an answer; short-timeout tests set their own.
const testQueryTimeout = 2 * time.Second

// newTestDNS returns a DNS that queries the given test servers in order.
func newTestDNS(timeout time.Duration, servers ...*testDNSServer) *DNS {
	addrs := make([]string, len(servers))
	for i, s := range servers {
		addrs[i] = s.Addr
	}
	return NewDNS(addrs, timeout)
}

func mustRR(t testing.TB, text string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(text)
	if err != nil || rr == nil {
		t.Fatalf("dns.NewRR(%q): %v", text, err)
	}
	return rr
}

// addChain adds a CNAME chain of steps CNAMEs from start to a name with a
// TXT record, and returns the names on the chain, start first.
func addChain(s *testDNSServer, start, zone string, steps int) []string {
	names := []string{start}
	for i := 1; i <= steps; i++ {
		names = append(names, fmt.Sprintf("c%d.%s", i, zone))
	}
	for i := range steps {
		s.Add(fmt.Sprintf("%s. 300 IN CNAME %s.", names[i], names[i+1]))
	}
	s.Add(fmt.Sprintf(`%s. 300 IN TXT "v=STSv1; id=chain%d"`, names[steps], steps))
	return names
}

// wantLookupErr checks that err wraps want (nil: no error).
func wantLookupErr(t *testing.T, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Fatalf("error = %v, want none", err)
	case want != nil && !errors.Is(err, want):
		t.Fatalf("error = %v, want one wrapping %v", err, want)
	}
}

func TestLookupTXT(t *testing.T) {
	const name = "_mta-sts.example.com"
	tests := []struct {
		name    string
		setup   func(t *testing.T, s *testDNSServer)
		lookup  string // default name
		want    []string
		wantErr error
		// wantQueries, when set, is the number of queries the server
		// must have seen in all.
		wantQueries int
	}{
		{
			name: "NOERROR",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=20160831085700Z;"`)
			},
			want:        []string{"v=STSv1; id=20160831085700Z;"},
			wantQueries: 1,
		},
		{
			name: "several RRs",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1;"`, `_mta-sts.example.com. 300 IN TXT "v=spf1 -all"`)
			},
			want: []string{"v=STSv1; id=1;", "v=spf1 -all"},
		},
		{
			name: "strings of one RR joined without separator",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; " "id=2016083108" "5700Z;"`)
			},
			want: []string{"v=STSv1; id=20160831085700Z;"},
		},
		{
			name: "escaped bytes returned raw",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "a\"b\\c\001d\255" "\;"`)
			},
			want: []string{"a\"b\\c\x01d\xff;"},
		},
		{
			name:  "empty TXT string",
			setup: func(t *testing.T, s *testDNSServer) { s.Add(`_mta-sts.example.com. 300 IN TXT ""`) },
			want:  []string{""},
		},
		{
			name:    "NXDOMAIN",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`other.example.com. 300 IN TXT "x"`) },
			wantErr: ErrNoRecord,
		},
		{
			name:    "NODATA",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`_mta-sts.example.com. 300 IN A 192.0.2.1`) },
			wantErr: ErrNoRecord,
		},
		{
			name:    "NODATA at empty non-terminal",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`x._mta-sts.example.com. 300 IN TXT "x"`) },
			wantErr: ErrNoRecord,
		},
		{
			name:    "SERVFAIL",
			setup:   func(t *testing.T, s *testDNSServer) { s.SetRcode(name, dns.RcodeServerFailure) },
			wantErr: ErrDNS,
		},
		{
			name:    "REFUSED",
			setup:   func(t *testing.T, s *testDNSServer) { s.SetRcode(name, dns.RcodeRefused) },
			wantErr: ErrDNS,
		},
		{
			name:    "FORMERR",
			setup:   func(t *testing.T, s *testDNSServer) { s.SetRcode(name, dns.RcodeFormatError) },
			wantErr: ErrDNS,
		},
		{
			name: "owner name in another case",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_MTA-STS.Example.COM. 300 IN TXT "v=STSv1; id=1;"`)
			},
			lookup: "_mta-sts.EXAMPLE.com",
			want:   []string{"v=STSv1; id=1;"},
		},
		{
			name: "CNAME chain in one answer",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME _mta-sts.provider.example.`,
					`_mta-sts.provider.example. 300 IN TXT "v=STSv1; id=delegated;"`)
			},
			want:        []string{"v=STSv1; id=delegated;"},
			wantQueries: 1,
		},
		{
			name: "CNAME target needs a second query",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME _mta-sts.provider.example.`,
					`_mta-sts.provider.example. 300 IN TXT "v=STSv1; id=delegated;"`)
				s.SetNoChase(name)
			},
			want:        []string{"v=STSv1; id=delegated;"},
			wantQueries: 2,
		},
		{
			name: "CNAME to a name without TXT",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME target.example.`, `target.example. 300 IN A 192.0.2.1`)
			},
			wantErr: ErrNoRecord,
		},
		{
			name:    "CNAME to NXDOMAIN",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`_mta-sts.example.com. 300 IN CNAME gone.example.`) },
			wantErr: ErrNoRecord,
		},
		{
			name: "CNAME to NXDOMAIN target needing a second query",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME gone.example.`)
				s.SetNoChase(name)
			},
			wantErr:     ErrNoRecord,
			wantQueries: 2,
		},
		{
			name: "8-step CNAME chain",
			setup: func(t *testing.T, s *testDNSServer) {
				addChain(s, name, "chain.example", 8)
			},
			want: []string{"v=STSv1; id=chain8"},
		},
		{
			name: "9-step CNAME chain",
			setup: func(t *testing.T, s *testDNSServer) {
				addChain(s, name, "chain.example", 9)
			},
			wantErr: ErrDNS,
		},
		{
			name: "8-step CNAME chain, one query per step",
			setup: func(t *testing.T, s *testDNSServer) {
				for _, n := range addChain(s, name, "chain.example", 8) {
					s.SetNoChase(n)
				}
			},
			want:        []string{"v=STSv1; id=chain8"},
			wantQueries: 9,
		},
		{
			name: "9-step CNAME chain, one query per step",
			setup: func(t *testing.T, s *testDNSServer) {
				for _, n := range addChain(s, name, "chain.example", 9) {
					s.SetNoChase(n)
				}
			},
			wantErr:     ErrDNS,
			wantQueries: 9,
		},
		{
			name: "CNAME loop in one answer",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME a.example.`,
					`a.example. 300 IN CNAME b.example.`,
					`b.example. 300 IN CNAME _mta-sts.example.com.`)
			},
			wantErr: ErrDNS,
		},
		{
			name: "CNAME to itself",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME _MTA-STS.example.com.`)
			},
			wantErr: ErrDNS,
		},
		{
			name: "CNAME loop over several queries",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME a.example.`, `a.example. 300 IN CNAME _mta-sts.example.com.`)
				s.SetNoChase(name)
				s.SetNoChase("a.example")
			},
			wantErr:     ErrDNS,
			wantQueries: 2,
		},
		{
			name: "two CNAMEs with different targets",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{
						mustRR(t, `_mta-sts.example.com. 300 IN CNAME a.example.`),
						mustRR(t, `_mta-sts.example.com. 300 IN CNAME b.example.`),
						mustRR(t, `a.example. 300 IN TXT "v=STSv1; id=a"`),
						mustRR(t, `b.example. 300 IN TXT "v=STSv1; id=b"`),
					}
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "answer for the wrong name ignored",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{mustRR(t, `evil.example. 300 IN TXT "v=STSv1; id=evil"`)}
					return m
				})
			},
			wantErr: ErrNoRecord,
		},
		{
			name: "records for other names dropped, the name's kept",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{
						mustRR(t, `evil.example. 300 IN TXT "v=STSv1; id=evil"`),
						mustRR(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=good"`),
						mustRR(t, `_mta-sts.example.com. 300 IN A 192.0.2.1`),
						mustRR(t, `_mta-sts.example.com. 300 CH TXT "v=STSv1; id=chaos"`),
					}
					return m
				})
			},
			want: []string{"v=STSv1; id=good"},
		},
		{
			name: "CNAME for another name ignored",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{
						mustRR(t, `other.example. 300 IN CNAME evil.example.`),
						mustRR(t, `evil.example. 300 IN TXT "v=STSv1; id=evil"`),
					}
					return m
				})
			},
			wantErr: ErrNoRecord,
		},
		{
			name: "reply for another name",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Question[0].Name = "evil.example."
					m.Answer = []dns.RR{mustRR(t, `evil.example. 300 IN TXT "v=STSv1; id=evil"`)}
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "reply for another type",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Question[0].Qtype = dns.TypeA
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "NOERROR reply without the question",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Question = nil
					m.Answer = []dns.RR{mustRR(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`)}
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "SERVFAIL reply without the question",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetRcode(req, dns.RcodeServerFailure)
					m.Question = nil
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "reply without QR bit",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Response = false
					m.Answer = []dns.RR{mustRR(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`)}
					return m
				})
			},
			wantErr: ErrDNS,
		},
		{
			name: "forced truncation: TCP retry",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=tcp;"`)
				s.SetTruncated(name)
			},
			want:        []string{"v=STSv1; id=tcp;"},
			wantQueries: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			tt.setup(t, s)
			lookup := tt.lookup
			if lookup == "" {
				lookup = name
			}
			got, _, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), lookup)
			if err != nil {
				t.Logf("error: %v", err)
			}
			wantLookupErr(t, err, tt.wantErr)
			if !slices.Equal(got, tt.want) {
				t.Errorf("LookupTXT(%q) = %q, want %q", lookup, got, tt.want)
			}
			if tt.wantQueries != 0 {
				if got := s.TotalQueries(); got != tt.wantQueries {
					t.Errorf("server saw %d queries, want %d", got, tt.wantQueries)
				}
			}
		})
	}
}

// TestLookupTXTRecordEndToEnd checks SPEC 3.1 and 3.3 together: a record
// split over two TXT strings is joined, then selected and parsed.
func TestLookupTXTRecordEndToEnd(t *testing.T) {
	s := newTestDNSServer(t)
	s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=2016" "0831085700Z;"`,
		`_mta-sts.example.com. 300 IN TXT "v=spf1 -all"`)
	txts, _, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), "_mta-sts.example.com")
	if err != nil {
		t.Fatalf("LookupTXT: %v", err)
	}
	rec, err := SelectRecord(txts)
	if err != nil {
		t.Fatalf("SelectRecord(%q): %v", txts, err)
	}
	if want := "20160831085700Z"; rec.ID != want {
		t.Fatalf("ID = %q, want %q", rec.ID, want)
	}
}

// TestLookupTXTTruncatedLargeAnswer: an answer larger than the advertised
// EDNS0 size comes truncated over UDP; the TCP retry gets all of it.
func TestLookupTXTTruncatedLargeAnswer(t *testing.T) {
	const name = "_mta-sts.example.com"
	s := newTestDNSServer(t)
	var want []string
	for i := range 8 {
		txt := fmt.Sprintf("%d%s", i, strings.Repeat("x", 250))
		s.Add(fmt.Sprintf(`%s. 300 IN TXT "%s"`, name, txt))
		want = append(want, txt)
	}
	got, _, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), name)
	if err != nil {
		t.Fatalf("LookupTXT: %v", err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("LookupTXT = %d strings, want %d: %q", len(got), len(want), got)
	}
	if got, want := s.TCPQueries(name, dns.TypeTXT), 1; got != want {
		t.Errorf("TCP queries = %d, want %d", got, want)
	}
	if got, want := s.Queries(name, dns.TypeTXT), 2; got != want {
		t.Errorf("queries = %d, want %d", got, want)
	}
}

// TestLookupTXTQueryFlags checks the query itself: RD, EDNS0 with 1232
// bytes and DO, CD clear, one question in class IN.
func TestLookupTXTQueryFlags(t *testing.T) {
	const name = "_mta-sts.example.com"
	s := newTestDNSServer(t)
	reqs := make(chan *dns.Msg, 1)
	s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
		select {
		case reqs <- req.Copy():
		default:
		}
		return new(dns.Msg).SetReply(req)
	})
	if _, _, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), name); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("LookupTXT error = %v, want ErrNoRecord", err)
	}
	req := <-reqs
	opt := req.IsEdns0()
	switch {
	case !req.RecursionDesired:
		t.Error("RD not set")
	case req.CheckingDisabled:
		t.Error("CD set")
	case opt == nil:
		t.Error("no EDNS0 OPT record")
	case opt.UDPSize() != 1232:
		t.Errorf("EDNS0 UDP size = %d, want 1232", opt.UDPSize())
	case !opt.Do():
		t.Error("DO not set")
	case len(req.Question) != 1 || req.Question[0] != (dns.Question{Name: name + ".", Qtype: dns.TypeTXT, Qclass: dns.ClassINET}):
		t.Errorf("question = %v", req.Question)
	}
}

func TestLookupTXTAuthentic(t *testing.T) {
	const name = "_mta-sts.example.com"
	tests := []struct {
		name  string
		setup func(t *testing.T, s *testDNSServer)
		want  bool
	}{
		{
			name: "AD set",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`)
				s.SetAD(true)
			},
			want: true,
		},
		{
			name: "AD clear",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`)
				s.SetAD(false)
			},
			want: false,
		},
		{
			name: "AD set on a chain in one answer",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME t.example.`)
				s.SetAD(true)
			},
			want: true,
		},
		{
			name: "AD set on every reply of a chain",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME t.example.`)
				s.SetNoChase(name)
				s.SetAD(true)
			},
			want: true,
		},
		{
			name: "AD clear on the second reply of a chain",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN CNAME t.example.`)
				s.SetNoChase(name)
				s.SetAD(true)
				s.SetHandler("t.example", func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{mustRR(t, `t.example. 300 IN TXT "v=STSv1; id=1"`)}
					return m
				})
			},
			want: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			s.Add(`t.example. 300 IN TXT "v=STSv1; id=1"`)
			tt.setup(t, s)
			_, ans, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), name)
			if err != nil {
				t.Fatalf("LookupTXT: %v", err)
			}
			if ans.Authentic != tt.want {
				t.Fatalf("Authentic = %v, want %v", ans.Authentic, tt.want)
			}
		})
	}
}

// TestLookupTXTTimeout: a silent server fails the lookup with ErrDNS after
// about the configured timeout.
func TestLookupTXTTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	s := newTestDNSServer(t)
	s.SetSilent("")
	start := time.Now()
	_, _, err := newTestDNS(timeout, s).LookupTXT(t.Context(), "_mta-sts.example.com")
	elapsed := time.Since(start)
	wantLookupErr(t, err, ErrDNS)
	if !strings.Contains(err.Error(), "timeout") {
		t.Errorf("error %q does not say timeout", err)
	}
	if elapsed < timeout || elapsed > timeout+time.Second {
		t.Errorf("lookup took %v, want about %v", elapsed, timeout)
	}
}

// TestLookupTXTMismatchedID: datagrams with another ID are not the reply;
// with no real reply the attempt times out.
func TestLookupTXTMismatchedID(t *testing.T) {
	wantReplyIgnored(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=spoofed"`,
		func(req, m *dns.Msg) { m.Id = req.Id + 1 })
}

// A reply with the right ID but another opcode is no answer to our query
// (RFC 1035 §4.1.1): the lookup fails instead of using its records.
func TestLookupTXTWrongOpcode(t *testing.T) {
	wantReplyIgnored(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=notify"`,
		func(req, m *dns.Msg) { m.Opcode = dns.OpcodeNotify })
}

// wantReplyIgnored serves, for _mta-sts.example.com, a reply to the query
// with record in its answer that spoil makes no answer to the query, and
// checks that the lookup fails with ErrDNS and returns no records.
func wantReplyIgnored(t *testing.T, record string, spoil func(req, m *dns.Msg)) {
	t.Helper()
	const name = "_mta-sts.example.com"
	s := newTestDNSServer(t)
	s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
		m := new(dns.Msg).SetReply(req)
		spoil(req, m)
		m.Answer = []dns.RR{mustRR(t, record)}
		return m
	})
	got, _, err := newTestDNS(200*time.Millisecond, s).LookupTXT(t.Context(), name)
	wantLookupErr(t, err, ErrDNS)
	if got != nil {
		t.Errorf("LookupTXT = %q, want nothing", got)
	}
}

// TestLookupTXTContext: the caller's ctx bounds the whole lookup, even
// with a long per-attempt timeout; its error stays visible to errors.Is.
func TestLookupTXTContext(t *testing.T) {
	s := newTestDNSServer(t)
	s.SetSilent("")
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, err := newTestDNS(time.Minute, s, s).LookupTXT(ctx, "_mta-sts.example.com")
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("lookup took %v after the context ended", elapsed)
	}
	wantLookupErr(t, err, ErrDNS)
	wantLookupErr(t, err, context.DeadlineExceeded)
	if got := s.TotalQueries(); got != 1 {
		t.Errorf("server saw %d queries, want 1 (no second server after ctx ended)", got)
	}

	ctx, cancel = context.WithCancel(t.Context())
	cancel()
	_, _, err = newTestDNS(time.Minute, s).LookupTXT(ctx, "_mta-sts.example.com")
	wantLookupErr(t, err, context.Canceled)
}

func TestLookupTXTFailover(t *testing.T) {
	const name = "_mta-sts.example.com"
	const txt = "v=STSv1; id=second;"
	tests := []struct {
		name          string
		first         func(t *testing.T, s *testDNSServer)
		want          []string
		wantErr       error
		wantSecondHit int
	}{
		{
			name:          "first times out",
			first:         func(t *testing.T, s *testDNSServer) { s.SetSilent("") },
			want:          []string{txt},
			wantSecondHit: 1,
		},
		{
			name:          "first SERVFAIL",
			first:         func(t *testing.T, s *testDNSServer) { s.SetRcode(name, dns.RcodeServerFailure) },
			want:          []string{txt},
			wantSecondHit: 1,
		},
		{
			name:          "first REFUSED",
			first:         func(t *testing.T, s *testDNSServer) { s.SetRcode(name, dns.RcodeRefused) },
			want:          []string{txt},
			wantSecondHit: 1,
		},
		{
			name: "first answers for another question",
			first: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(name, func(req *dns.Msg) *dns.Msg {
					m := new(dns.Msg).SetReply(req)
					m.Question[0].Name = "evil.example."
					return m
				})
			},
			want:          []string{txt},
			wantSecondHit: 1,
		},
		{
			name:          "first NXDOMAIN is final",
			first:         func(t *testing.T, s *testDNSServer) {},
			wantErr:       ErrNoRecord,
			wantSecondHit: 0,
		},
		{
			name: "first NOERROR is final",
			first: func(t *testing.T, s *testDNSServer) {
				s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=first;"`)
			},
			want:          []string{"v=STSv1; id=first;"},
			wantSecondHit: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			first, second := newTestDNSServer(t), newTestDNSServer(t)
			tt.first(t, first)
			second.Add(fmt.Sprintf(`%s. 300 IN TXT %q`, name, txt))
			got, _, err := newTestDNS(300*time.Millisecond, first, second).LookupTXT(t.Context(), name)
			wantLookupErr(t, err, tt.wantErr)
			if !slices.Equal(got, tt.want) {
				t.Errorf("LookupTXT = %q, want %q", got, tt.want)
			}
			if got := first.Queries(name, dns.TypeTXT); got != 1 {
				t.Errorf("first server saw %d queries, want 1", got)
			}
			if got := second.Queries(name, dns.TypeTXT); got != tt.wantSecondHit {
				t.Errorf("second server saw %d queries, want %d", got, tt.wantSecondHit)
			}
		})
	}
}

// TestLookupTXTFailoverClosedPort: a network error (ICMP port
// unreachable) moves on to the next server.
func TestLookupTXTFailoverClosedPort(t *testing.T) {
	const name = "_mta-sts.example.com"
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := pc.LocalAddr().String()
	pc.Close()
	s := newTestDNSServer(t)
	s.Add(`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`)
	got, _, err := NewDNS([]string{closed, s.Addr}, testQueryTimeout).LookupTXT(t.Context(), name)
	if err != nil {
		t.Fatalf("LookupTXT: %v", err)
	}
	if want := []string{"v=STSv1; id=1"}; !slices.Equal(got, want) {
		t.Fatalf("LookupTXT = %q, want %q", got, want)
	}
}

func TestLookupTXTAllServersFail(t *testing.T) {
	const name = "_mta-sts.example.com"
	first, second := newTestDNSServer(t), newTestDNSServer(t)
	first.SetSilent("")
	second.SetRcode(name, dns.RcodeServerFailure)
	_, _, err := newTestDNS(200*time.Millisecond, first, second).LookupTXT(t.Context(), name)
	wantLookupErr(t, err, ErrDNS)
	if want := "SERVFAIL from " + second.Addr; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name the last failure %q", err, want)
	}
}

func TestLookupTXTNoServers(t *testing.T) {
	_, _, err := NewDNS(nil, time.Second).LookupTXT(t.Context(), "_mta-sts.example.com")
	wantLookupErr(t, err, ErrDNS)
}

// TestDNSErrorText checks the error format and SPEC 8.3: remote names in
// errors are bounded.
func TestDNSErrorText(t *testing.T) {
	s := newTestDNSServer(t)
	s.SetRcode("_mta-sts.example.com", dns.RcodeServerFailure)
	_, _, err := newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), "_mta-sts.example.com")
	want := "resolver: DNS lookup failed: _mta-sts.example.com TXT: SERVFAIL from " + s.Addr
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %q", err, want)
	}

	// A failure at a CNAME target, a remote-chosen name of 200 bytes.
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + ".example."
	s.Add(`_mta-sts.long.example. 300 IN CNAME ` + long)
	s.SetNoChase("_mta-sts.long.example")
	s.SetRcode(long, dns.RcodeServerFailure)
	_, _, err = newTestDNS(testQueryTimeout, s).LookupTXT(t.Context(), "_mta-sts.long.example")
	wantLookupErr(t, err, ErrDNS)
	if len(err.Error()) > 200 {
		t.Errorf("error is %d bytes, want at most 200: %v", len(err.Error()), err)
	}
}

func TestLookupHost(t *testing.T) {
	const host = "mta-sts.example.com"
	tests := []struct {
		name    string
		setup   func(t *testing.T, s *testDNSServer)
		want    []string
		wantErr error
	}{
		{
			name:  "A only",
			setup: func(t *testing.T, s *testDNSServer) { s.Add(`mta-sts.example.com. 300 IN A 192.0.2.1`) },
			want:  []string{"192.0.2.1"},
		},
		{
			name:  "AAAA only",
			setup: func(t *testing.T, s *testDNSServer) { s.Add(`mta-sts.example.com. 300 IN AAAA 2001:db8::1`) },
			want:  []string{"2001:db8::1"},
		},
		{
			name: "both, IPv4 first",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`mta-sts.example.com. 300 IN AAAA 2001:db8::1`,
					`mta-sts.example.com. 300 IN AAAA 2001:db8::2`,
					`mta-sts.example.com. 300 IN A 192.0.2.1`,
					`mta-sts.example.com. 300 IN A 192.0.2.2`)
			},
			want: []string{"192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"},
		},
		{
			name: "through a CNAME",
			setup: func(t *testing.T, s *testDNSServer) {
				s.Add(`mta-sts.example.com. 300 IN CNAME web.provider.example.`,
					`web.provider.example. 300 IN A 192.0.2.7`,
					`web.provider.example. 300 IN AAAA 2001:db8::7`)
			},
			want: []string{"192.0.2.7", "2001:db8::7"},
		},
		{
			name:    "none: NODATA",
			setup:   func(t *testing.T, s *testDNSServer) { s.Add(`mta-sts.example.com. 300 IN TXT "x"`) },
			wantErr: ErrNoRecord,
		},
		{
			name:    "none: NXDOMAIN",
			setup:   func(t *testing.T, s *testDNSServer) {},
			wantErr: ErrNoRecord,
		},
		{
			name:    "both fail",
			setup:   func(t *testing.T, s *testDNSServer) { s.SetRcode(host, dns.RcodeServerFailure) },
			wantErr: ErrDNS,
		},
		{
			name: "A fails, AAAA answers",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(host, func(req *dns.Msg) *dns.Msg {
					if req.Question[0].Qtype == dns.TypeA {
						return new(dns.Msg).SetRcode(req, dns.RcodeServerFailure)
					}
					m := new(dns.Msg).SetReply(req)
					m.Answer = []dns.RR{mustRR(t, `mta-sts.example.com. 300 IN AAAA 2001:db8::1`)}
					return m
				})
			},
			want: []string{"2001:db8::1"},
		},
		{
			name: "A fails, AAAA NODATA",
			setup: func(t *testing.T, s *testDNSServer) {
				s.SetHandler(host, func(req *dns.Msg) *dns.Msg {
					if req.Question[0].Qtype == dns.TypeA {
						return new(dns.Msg).SetRcode(req, dns.RcodeServerFailure)
					}
					return new(dns.Msg).SetReply(req)
				})
			},
			wantErr: ErrDNS,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestDNSServer(t)
			tt.setup(t, s)
			got, err := newTestDNS(testQueryTimeout, s).LookupHost(t.Context(), host)
			wantLookupErr(t, err, tt.wantErr)
			var want []netip.Addr
			for _, a := range tt.want {
				want = append(want, netip.MustParseAddr(a))
			}
			if !slices.Equal(got, want) {
				t.Errorf("LookupHost = %v, want %v", got, want)
			}
			if got, want := s.Queries(host, dns.TypeA)+s.Queries(host, dns.TypeAAAA), 2; got != want {
				t.Errorf("server saw %d A/AAAA queries for %s, want %d", got, host, want)
			}
		})
	}
}

func TestServersFromResolvConf(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []string
		wantErr bool
	}{
		{
			name: "comments, IPv6, options",
			content: `# generated by resolvconf
; another comment
domain example.com
search example.com example.net
nameserver 192.0.2.53
nameserver 2001:db8::53
  nameserver	fe80::1%eth0   # trailing comment
#nameserver 192.0.2.99
;nameserver 192.0.2.98
nameserver not-an-address
nameserver
options edns0 trust-ad
`,
			want: []string{"192.0.2.53:53", "[2001:db8::53]:53", "[fe80::1%eth0]:53"},
		},
		{
			name:    "single server without final newline",
			content: "nameserver 127.0.0.53",
			want:    []string{"127.0.0.53:53"},
		},
		{
			name:    "no servers",
			content: "# nothing here\nsearch example.com\noptions ndots:2\n",
			wantErr: true,
		},
		{
			name:    "empty file",
			content: "",
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "resolv.conf")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := ServersFromResolvConf(path)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ServersFromResolvConf error = %v, want error %v", err, tt.wantErr)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("ServersFromResolvConf = %q, want %q", got, tt.want)
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		if _, err := ServersFromResolvConf(filepath.Join(t.TempDir(), "nope")); err == nil {
			t.Fatal("ServersFromResolvConf of a missing file: no error")
		}
	})
}
