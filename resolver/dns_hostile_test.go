package resolver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"
)

// The hostile DNS suite (issue 8): a resolver that is slow, broken or
// lying must make discovery end, within a bounded time and memory, in the
// error class the cache relies on (SPEC 3.4: ErrNoRecord is "no policy",
// ErrDNS is "discovery failed", which never removes a cached policy), with a
// bounded error text (SPEC 8.3), and without leaving a goroutine behind.
//
// The well-formed variants of several cases are checked for their exact
// results elsewhere: TestLookupTXT (CNAME chains of 8 and 9 steps, loops,
// records for other names, replies for another question, forced
// truncation), TestLookupTXTTruncatedLargeAnswer, TestLookupTXTTimeout,
// TestLookupTXTMismatchedID, TestLookupTXTFailover and TestDNSErrorText.

const (
	hostileDomain = "example.com"
	hostileName   = "_mta-sts.example.com."
	// hostileTimeout is the per-attempt timeout for cases where a server
	// stays silent; the others use testQueryTimeout and never wait on it.
	hostileTimeout = 300 * time.Millisecond
	// maxHostileErrLen bounds an error's text: fixed words, two names
	// clipped to maxErrNameLen and a server address (SPEC 8.3).
	maxHostileErrLen = 300
	// maxHostileAlloc bounds the heap one case allocates, the test
	// servers included: a 64 KiB reply costs a few copies of it, an
	// unbounded read would cost far more.
	maxHostileAlloc = 8 << 20
)

func TestHostileDNS(t *testing.T) {
	tests := []struct {
		name string
		// serve starts the case's servers, stopped in t.Cleanup, and
		// returns their addresses in the order the resolver asks them.
		serve   func(t *testing.T) []string
		timeout time.Duration // per attempt; 0: testQueryTimeout
		wantID  string        // the record found, when wantErr is nil
		wantErr error
		// within bounds the lookup's duration: generous, to catch a
		// hang, not to measure.
		within time.Duration
	}{
		{
			name: "servers never answer",
			serve: func(t *testing.T) []string {
				a, b := newTestDNSServer(t), newTestDNSServer(t)
				a.SetSilent("")
				b.SetSilent("")
				return []string{a.Addr, b.Addr}
			},
			timeout: hostileTimeout,
			wantErr: ErrDNS,
			within:  3 * time.Second,
		},
		{
			name: "SERVFAIL from every server",
			serve: func(t *testing.T) []string {
				a, b := newTestDNSServer(t), newTestDNSServer(t)
				a.SetRcode(hostileName, dns.RcodeServerFailure)
				b.SetRcode(hostileName, dns.RcodeServerFailure)
				return []string{a.Addr, b.Addr}
			},
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// RFC 7766 §5: the truncated reply's records are not used,
			// even when they look complete.
			name: "truncated UDP reply, TCP retry answers",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t,
					func(req *dns.Msg) [][]byte {
						return [][]byte{packReply(t, req, dns.RcodeSuccess, true, txtRR(hostileName, "v=STSv1; id=decoy"))}
					},
					func(conn net.Conn, req *dns.Msg) {
						writeTCP(conn, packReply(t, req, dns.RcodeSuccess, false, txtRR(hostileName, "v=STSv1; id=overtcp")))
					})}
			},
			wantID: "overtcp",
			within: 2 * time.Second,
		},
		{
			name: "truncated UDP reply, TCP connection closed",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, truncatedUDP(t), nil)}
			},
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			name: "truncated UDP reply, TCP retry never answered",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, truncatedUDP(t), func(conn net.Conn, req *dns.Msg) {
					_, _ = io.Copy(io.Discard, conn) // until the client gives up
				})}
			},
			timeout: hostileTimeout,
			wantErr: ErrDNS,
			within:  3 * time.Second,
		},
		{
			name: "truncated over TCP too",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, truncatedUDP(t), func(conn net.Conn, req *dns.Msg) {
					writeTCP(conn, packReply(t, req, dns.RcodeSuccess, true, txtRR(hostileName, "v=STSv1; id=1")))
				})}
			},
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// SPEC 3.2: junk and near misses are not candidates.
			name:   "100 TXT records, one STSv1",
			serve:  serveRRs(hundredTXT("v=STSv1; id=theone")...),
			wantID: "theone",
			within: 2 * time.Second,
		},
		{
			// SPEC 3.2: two valid records mean no policy.
			name:    "100 TXT records, two valid STSv1",
			serve:   serveRRs(hundredTXT("v=STSv1; id=one", "v=STSv1; id=two")...),
			wantErr: ErrInvalidRecord,
			within:  2 * time.Second,
		},
		{
			name:    "100 TXT records, one valid and one invalid STSv1",
			serve:   serveRRs(hundredTXT("v=STSv1; id=one", "v=STSv1; id=not-an-id")...),
			wantErr: ErrInvalidRecord,
			within:  2 * time.Second,
		},
		{
			name:    "100 TXT records, near misses only",
			serve:   serveRRs(hundredTXT()...),
			wantErr: ErrNoRecord,
			within:  2 * time.Second,
		},
		{
			name: "64 KiB answer over TCP: 220 long TXT records, one STSv1",
			serve: func(t *testing.T) []string {
				var rrs []dns.RR
				for i := range 220 {
					rrs = append(rrs, txtRR(hostileName, fmt.Sprintf("%03d%s", i, strings.Repeat("j", 252))))
				}
				rrs[110] = txtRR(hostileName, "v=STSv1; id=needle")
				return serveRRs(near64KiB(t, rrs...)...)(t)
			},
			wantID: "needle",
			within: 2 * time.Second,
		},
		{
			name: "64 KiB TXT record, valid STSv1 with a long extension",
			serve: func(t *testing.T) []string {
				return serveRRs(near64KiB(t, txtRR(hostileName, longTXT("v=STSv1; id=big; ext=", 'a')...))...)(t)
			},
			wantID: "big",
			within: 2 * time.Second,
		},
		{
			// The error quotes at most a few bytes of the id.
			name: "64 KiB TXT record, STSv1 with a 64 KiB id",
			serve: func(t *testing.T) []string {
				return serveRRs(near64KiB(t, txtRR(hostileName, longTXT("v=STSv1; id=", 'x')...))...)(t)
			},
			wantErr: ErrInvalidRecord,
			within:  2 * time.Second,
		},
		{
			// A server that ignores the EDNS0 size of the query; the
			// read buffer takes any datagram.
			name: "64 KiB UDP datagram",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, func(req *dns.Msg) [][]byte {
					rrs := []dns.RR{txtRR(hostileName, "v=STSv1; id=bigudp")}
					for range 200 {
						rrs = append(rrs, txtRR(hostileName, strings.Repeat("u", 255)))
					}
					return [][]byte{packReply(t, req, dns.RcodeSuccess, false, rrs...)}
				}, nil)}
			},
			wantID: "bigudp",
			within: 2 * time.Second,
		},
		{
			// Only the announced 64 KiB are read, never to the end of
			// the stream.
			name: "TCP length prefix followed by endless bytes",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, truncatedUDP(t), func(conn net.Conn, req *dns.Msg) {
					junk := make([]byte, 32<<10)
					junk[0], junk[1] = 0xff, 0xff
					for {
						if _, err := conn.Write(junk); err != nil {
							return
						}
						junk[0], junk[1] = 0, 0
					}
				})}
			},
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			name: "TCP reply shorter than its length prefix",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, truncatedUDP(t), func(conn net.Conn, req *dns.Msg) {
					_, _ = conn.Write(append([]byte{0xff, 0xff}, packReply(t, req, dns.RcodeSuccess, false)...))
				})}
			},
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// RFC 5452 §9.1: datagrams with another ID are dropped, the
			// reply that follows them is taken.
			name: "spoofed datagrams before the reply",
			serve: func(t *testing.T) []string {
				return []string{newRawDNSServer(t, func(req *dns.Msg) [][]byte {
					var out [][]byte
					for i := range 50 {
						spoof := req.Copy()
						spoof.Id += uint16(i + 1)
						out = append(out, packReply(t, spoof, dns.RcodeSuccess, false, txtRR(hostileName, "v=STSv1; id=spoofed")))
					}
					return append(out, packReply(t, req, dns.RcodeSuccess, false, txtRR(hostileName, "v=STSv1; id=real")))
				}, nil)}
			},
			wantID: "real",
			within: 2 * time.Second,
		},
		{
			name: "CNAME loop of long names in one answer",
			serve: single(func(t *testing.T, s *testDNSServer) {
				a, b := longOwner("a"), longOwner("b")
				s.Add(hostileName+" 300 IN CNAME "+a, a+" 300 IN CNAME "+b, b+" 300 IN CNAME "+hostileName)
			}),
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			name: "CNAME loop of long names, one query per step",
			serve: single(func(t *testing.T, s *testDNSServer) {
				a, b := longOwner("a"), longOwner("b")
				s.Add(hostileName+" 300 IN CNAME "+a, a+" 300 IN CNAME "+b, b+" 300 IN CNAME "+a)
				for _, n := range []string{hostileName, a, b} {
					s.SetNoChase(n)
				}
			}),
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// maxCNAMESteps is 8: a discovery failure after 9 queries.
			name: "20-step CNAME chain, one query per step",
			serve: single(func(t *testing.T, s *testDNSServer) {
				for _, n := range addChain(s, strings.TrimSuffix(hostileName, "."), "chain.example", 20) {
					s.SetNoChase(n)
				}
			}),
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			name: "20-step CNAME chain in one answer",
			serve: answering(func(t *testing.T, m *dns.Msg) {
				owner := hostileName
				for i := range 20 {
					target := fmt.Sprintf("c%d.%s", i+1, longOwner("chain"))
					m.Answer = append(m.Answer, mustRR(t, owner+" 300 IN CNAME "+target))
					owner = target
				}
				m.Answer = append(m.Answer, txtRR(owner, "v=STSv1; id=end"))
			}),
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// Owners that differ from the query name by a label, a
			// suffix or a character; all of them are ignored.
			name: "records for other names only",
			serve: answering(func(t *testing.T, m *dns.Msg) {
				for i := range 25 {
					for _, owner := range []string{
						"_mta-sts.example.com.evil.", "x._mta-sts.example.com.",
						"mta-sts.example.com.", fmt.Sprintf("_mta-sts%d.example.com.", i),
					} {
						m.Answer = append(m.Answer, txtRR(owner, "v=STSv1; id=wrongname"))
					}
				}
			}),
			wantErr: ErrNoRecord,
			within:  2 * time.Second,
		},
		{
			// SPF (type 99) has TXT's data format: still not TXT.
			name: "records of other types at the name only",
			serve: answering(func(t *testing.T, m *dns.Msg) {
				m.Answer = []dns.RR{
					mustRR(t, hostileName+` 300 IN SPF "v=STSv1; id=spf"`),
					mustRR(t, hostileName+` 300 IN A 192.0.2.1`),
					mustRR(t, hostileName+` 300 IN MX 10 mx.example.com.`),
					mustRR(t, hostileName+` 300 CH TXT "v=STSv1; id=chaos"`),
				}
			}),
			wantErr: ErrNoRecord,
			within:  2 * time.Second,
		},
		{
			name: "reply for the question in another class",
			serve: answering(func(t *testing.T, m *dns.Msg) {
				m.Question[0].Qclass = dns.ClassCHAOS
				m.Answer = []dns.RR{txtRR(hostileName, "v=STSv1; id=chaos")}
			}),
			wantErr: ErrDNS,
			within:  2 * time.Second,
		},
		{
			// SPEC 3.4: NXDOMAIN is no record, whatever else it carries.
			name: "NXDOMAIN carrying a record",
			serve: answering(func(t *testing.T, m *dns.Msg) {
				m.Rcode = dns.RcodeNameError
				m.Answer = []dns.RR{txtRR(hostileName, "v=STSv1; id=denied")}
			}),
			wantErr: ErrNoRecord,
			within:  2 * time.Second,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Registered first, so run last: after the servers stop.
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) })

			timeout := tt.timeout
			if timeout == 0 {
				timeout = testQueryTimeout
			}
			r := &Resolver{DNS: NewDNS(tt.serve(t), timeout)}
			// A backstop only: a hang fails the within check below
			// instead of the whole test binary.
			ctx, cancel := context.WithTimeout(t.Context(), tt.within+5*time.Second)
			defer cancel()

			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			rec, err := r.LookupRecord(ctx, hostileDomain)
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("%+v in %v, %d KiB allocated: %v", rec, elapsed.Round(time.Millisecond), alloc>>10, err)

			if elapsed > tt.within {
				t.Errorf("lookup took %v, want at most %v", elapsed, tt.within)
			}
			if alloc > maxHostileAlloc {
				t.Errorf("lookup allocated %d bytes, want at most %d", alloc, maxHostileAlloc)
			}
			if tt.wantErr == nil {
				if err != nil || rec.ID != tt.wantID {
					t.Fatalf("LookupRecord = %+v, %v; want id %q", rec, err, tt.wantID)
				}
				return
			}
			if err == nil {
				t.Fatalf("LookupRecord = %+v, want an error wrapping %v", rec, tt.wantErr)
			}
			// The classes are exclusive: the cache keeps a policy on
			// ErrDNS only (SPEC 3.4).
			for _, class := range []error{ErrDNS, ErrNoRecord, ErrInvalidRecord} {
				if got, want := errors.Is(err, class), class == tt.wantErr; got != want {
					t.Errorf("errors.Is(%v, %v) = %v, want %v", err, class, got, want)
				}
			}
			if n := len(err.Error()); n > maxHostileErrLen {
				t.Errorf("error is %d bytes, want at most %d: %.400s...", n, maxHostileErrLen, err)
			}
		})
	}
}

// single serves from one test server set up by setup.
func single(setup func(t *testing.T, s *testDNSServer)) func(t *testing.T) []string {
	return func(t *testing.T) []string {
		s := newTestDNSServer(t)
		setup(t, s)
		return []string{s.Addr}
	}
}

// answering serves from one test server whose reply to a query for
// hostileName is set by build: it gets a NOERROR reply to the query, with
// the question and no records, and fills in what the case needs.
func answering(build func(t *testing.T, m *dns.Msg)) func(t *testing.T) []string {
	return single(func(t *testing.T, s *testDNSServer) {
		s.SetHandler(hostileName, func(req *dns.Msg) *dns.Msg {
			m := new(dns.Msg).SetReply(req)
			build(t, m)
			return m
		})
	})
}

// serveRRs serves rrs from one test server, which truncates them over UDP
// when they exceed the EDNS0 size, so that the client retries over TCP.
func serveRRs(rrs ...dns.RR) func(t *testing.T) []string {
	return single(func(t *testing.T, s *testDNSServer) { s.AddRR(rrs...) })
}

// txtRR returns a TXT RR; parts are character-strings in miekg/dns's
// presentation format (`\"`, `\\` and `\DDD` escaped).
func txtRR(owner string, parts ...string) *dns.TXT {
	return &dns.TXT{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 300}, Txt: parts}
}

// hundredTXT returns sts and junk TXT RRs at hostileName, 100 in all: SPF,
// verification tokens, escaped bytes, and strings that are nearly but not
// STSv1 candidates (SPEC 3.2).
func hundredTXT(sts ...string) []dns.RR {
	junk := []string{
		"v=spf1 -all", "google-site-verification=%02dabcdef", `bin\000\255\"\\%02d`,
		"v=STSv10; id=%02d", "V=STSv1; id=%02d", " v=STSv1; id=%02d", "v=STSv1id=%02d",
		"v=STSv1:id=%02d", "v=stsv1; id=%02d", "%02d v=STSv1; id=x",
	}
	var rrs []dns.RR
	for i := 0; len(rrs)+len(sts) < 100; i++ {
		text := junk[i%len(junk)]
		if strings.Contains(text, "%") {
			text = fmt.Sprintf(text, i)
		}
		rrs = append(rrs, txtRR(hostileName, text))
	}
	for i, s := range sts {
		at := (i + 1) * len(rrs) / (len(sts) + 1)
		rrs = append(rrs[:at], append([]dns.RR{txtRR(hostileName, s)}, rrs[at:]...)...)
	}
	return rrs
}

// longTXT returns the character-strings of one TXT RR of about 64000
// bytes: prefix, then 250 strings of 255 times fill.
func longTXT(prefix string, fill byte) []string {
	parts := []string{prefix}
	for range 250 {
		parts = append(parts, strings.Repeat(string(fill), 255))
	}
	return parts
}

// near64KiB checks that a reply with rrs, packed as the test server packs
// it (without name compression), is near the 64 KiB limit of a DNS message,
// so that the case tests what it says, and returns rrs.
func near64KiB(t *testing.T, rrs ...dns.RR) []dns.RR {
	t.Helper()
	m := new(dns.Msg).SetQuestion(hostileName, dns.TypeTXT)
	m.Response, m.Answer = true, rrs
	m.SetEdns0(ednsUDPSize, true)
	wire, err := m.Pack()
	if err != nil || len(wire) < 60000 {
		t.Fatalf("reply: %d bytes, %v; want 60000 to 65535", len(wire), err)
	}
	return rrs
}

// longOwner returns a name of about 200 bytes under label.example, longer
// than the clip of names in errors (maxErrNameLen).
func longOwner(label string) string {
	l := strings.Repeat("l", 63)
	return fmt.Sprintf("%s.%s.%s.%s.example.", l, l, l, label)
}

// packReply packs the reply to req with rcode, the TC bit and rrs in the
// answer section, as the raw server sends it.
func packReply(t *testing.T, req *dns.Msg, rcode int, truncated bool, rrs ...dns.RR) []byte {
	m := new(dns.Msg).SetRcode(req, rcode)
	m.Truncated, m.Answer, m.Compress = truncated, rrs, true
	wire, err := m.Pack()
	if err != nil {
		t.Errorf("packing a reply: %v", err)
	}
	return wire
}

// truncatedUDP answers every UDP query with an empty truncated reply.
func truncatedUDP(t *testing.T) func(req *dns.Msg) [][]byte {
	return func(req *dns.Msg) [][]byte { return [][]byte{packReply(t, req, dns.RcodeSuccess, true)} }
}

// writeTCP writes one length-prefixed message (RFC 1035 §4.2.2).
func writeTCP(conn net.Conn, wire []byte) {
	_, _ = conn.Write(binary.BigEndian.AppendUint16(nil, uint16(len(wire))))
	_, _ = conn.Write(wire)
}

// newRawDNSServer starts a DNS server at the wire level on 127.0.0.1 (UDP
// and TCP on one port), for what a miekg/dns server does not send: several
// datagrams for one query, a length prefix that lies, a TCP retry met by a
// closed or silent connection. udp returns the datagrams that answer a
// query (none: silence). tcp serves a connection whose query has been read;
// the connection closes when it returns, at once for a nil tcp. The server
// stops in t.Cleanup, closing the connections still open.
func newRawDNSServer(t *testing.T, udp func(req *dns.Msg) [][]byte, tcp func(conn net.Conn, req *dns.Msg)) string {
	t.Helper()
	pc, l := listenUDPAndTCP(t)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = map[net.Conn]bool{}
		closed bool
	)
	wg.Go(func() {
		buf := make([]byte, dns.MaxMsgSize)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			req := new(dns.Msg)
			if req.Unpack(buf[:n]) != nil {
				continue
			}
			for _, out := range udp(req) {
				_, _ = pc.WriteTo(out, from)
			}
		}
	})
	wg.Go(func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				conn.Close()
				return
			}
			conns[conn] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, conn)
					mu.Unlock()
					conn.Close()
				}()
				var length [2]byte
				if _, err := io.ReadFull(conn, length[:]); err != nil {
					return
				}
				wire := make([]byte, binary.BigEndian.Uint16(length[:]))
				if _, err := io.ReadFull(conn, wire); err != nil {
					return
				}
				req := new(dns.Msg)
				if req.Unpack(wire) != nil || tcp == nil {
					return
				}
				tcp(conn, req)
			})
		}
	})
	t.Cleanup(func() {
		pc.Close()
		l.Close()
		mu.Lock()
		closed = true
		for conn := range conns {
			conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return pc.LocalAddr().String()
}
