package resolver

import (
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"

	"stsmap/internal/fixture"
)

// testDNSServer stands in for a recursive resolver in tests: a miekg/dns
// server on 127.0.0.1, UDP and TCP on the same port, answering from a zone
// the test fills. Like a recursive resolver it follows CNAMEs within its
// zone and returns the chain with the target's records in one answer.
//
// Behaviour is set per name (case-insensitive, with or without the trailing
// dot): a forced rcode, truncated UDP answers, silence (no answer at all),
// CNAMEs not followed, or a custom reply. Queries are counted per name,
// type and transport. All methods are safe to call while the server runs;
// the server shuts down in t.Cleanup.
type testDNSServer struct {
	// Addr is the server's "127.0.0.1:port", for NewDNS.
	Addr string

	t        testing.TB
	mu       sync.Mutex
	records  map[testDNSKey][]dns.RR
	rcodes   map[string]int
	truncate map[string]bool
	silent   map[string]bool
	noChase  map[string]bool
	handlers map[string]func(req *dns.Msg) *dns.Msg
	ad       bool
	queries  map[testDNSQuery]int
}

type testDNSKey struct {
	name  string
	qtype uint16
}

type testDNSQuery struct {
	name    string
	qtype   uint16
	network string // "udp" or "tcp"
}

// newTestDNSServer starts a server with an empty zone (every name
// NXDOMAIN) and waits until it listens on both transports.
func newTestDNSServer(t testing.TB) *testDNSServer {
	t.Helper()
	s := &testDNSServer{
		t:        t,
		records:  map[testDNSKey][]dns.RR{},
		rcodes:   map[string]int{},
		truncate: map[string]bool{},
		silent:   map[string]bool{},
		noChase:  map[string]bool{},
		handlers: map[string]func(*dns.Msg) *dns.Msg{},
		queries:  map[testDNSQuery]int{},
	}
	pc, l := listenUDPAndTCP(t)
	s.Addr = pc.LocalAddr().String()

	handler := dns.HandlerFunc(s.serveDNS)
	udpStarted, tcpStarted := make(chan struct{}), make(chan struct{})
	udp := &dns.Server{PacketConn: pc, Handler: handler, NotifyStartedFunc: func() { close(udpStarted) }}
	tcp := &dns.Server{Listener: l, Handler: handler, NotifyStartedFunc: func() { close(tcpStarted) }}
	done := make(chan error, 2)
	go func() { done <- udp.ActivateAndServe() }()
	go func() { done <- tcp.ActivateAndServe() }()
	for _, started := range []chan struct{}{udpStarted, tcpStarted} {
		select {
		case <-started:
		case err := <-done:
			t.Fatalf("test DNS server: %v", err)
		}
	}
	t.Cleanup(func() {
		_ = udp.Shutdown()
		_ = tcp.Shutdown()
		<-done
		<-done
	})
	return s
}

// listenUDPAndTCP is fixture.ListenUDPAndTCP on a free 127.0.0.1 port.
func listenUDPAndTCP(t testing.TB) (net.PacketConn, net.Listener) {
	t.Helper()
	pc, l, err := fixture.ListenUDPAndTCP("127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	return pc, l
}

// Add adds records in zone-file syntax, such as
// `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=1"`.
func (s *testDNSServer) Add(records ...string) {
	s.t.Helper()
	for _, text := range records {
		rr, err := dns.NewRR(text)
		if err != nil || rr == nil {
			s.t.Fatalf("test DNS server: bad record %q: %v", text, err)
		}
		s.AddRR(rr)
	}
}

// AddRR adds records.
func (s *testDNSServer) AddRR(rrs ...dns.RR) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rr := range rrs {
		k := testDNSKey{dns.CanonicalName(rr.Header().Name), rr.Header().Rrtype}
		s.records[k] = append(s.records[k], rr)
	}
}

// SetRcode answers every query for name with rcode and no records.
func (s *testDNSServer) SetRcode(name string, rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcodes[dns.CanonicalName(name)] = rcode
}

// SetTruncated answers UDP queries for name with the TC bit and no
// records, forcing a retry over TCP, which gets the full answer. (Answers
// larger than the query's EDNS0 size are truncated over UDP anyway.)
func (s *testDNSServer) SetTruncated(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.truncate[dns.CanonicalName(name)] = true
}

// SetSilent makes the server never answer queries for name, over either
// transport; name "" silences every query.
func (s *testDNSServer) SetSilent(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name != "" {
		name = dns.CanonicalName(name)
	}
	s.silent[name] = true
}

// SetNoChase makes a CNAME at name end the answer, as if the resolver had
// not followed it, so that the client has to query the target itself.
func (s *testDNSServer) SetNoChase(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noChase[dns.CanonicalName(name)] = true
}

// SetAD sets the AD bit on answers to queries that ask for DNSSEC (DO or
// AD set), as a validating resolver does for validated data.
func (s *testDNSServer) SetAD(ad bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ad = ad
}

// SetHandler replaces the answer for name with h's reply to the query,
// sent as is (ID, question and flags included); a nil reply sends nothing.
func (s *testDNSServer) SetHandler(name string, h func(req *dns.Msg) *dns.Msg) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[dns.CanonicalName(name)] = h
}

// Queries returns how many queries for name and qtype arrived, over both
// transports.
func (s *testDNSServer) Queries(name string, qtype uint16) int {
	return s.count(name, qtype, "udp") + s.count(name, qtype, "tcp")
}

// TCPQueries returns how many queries for name and qtype arrived over TCP.
func (s *testDNSServer) TCPQueries(name string, qtype uint16) int {
	return s.count(name, qtype, "tcp")
}

// TotalQueries returns how many queries arrived in all.
func (s *testDNSServer) TotalQueries() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.queries {
		n += c
	}
	return n
}

func (s *testDNSServer) count(name string, qtype uint16, network string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[testDNSQuery{dns.CanonicalName(name), qtype, network}]
}

func (s *testDNSServer) serveDNS(w dns.ResponseWriter, req *dns.Msg) {
	network := w.LocalAddr().Network()
	if len(req.Question) != 1 {
		_ = w.WriteMsg(new(dns.Msg).SetRcode(req, dns.RcodeFormatError))
		return
	}
	q := req.Question[0]
	name := dns.CanonicalName(q.Name)
	opt := req.IsEdns0()
	reply := new(dns.Msg).SetReply(req)

	// Decide under the lock, answer without it: a SetHandler function may
	// call the server's methods.
	s.mu.Lock()
	s.queries[testDNSQuery{name, q.Qtype, network}]++
	silent := s.silent[""] || s.silent[name]
	handler := s.handlers[name]
	rcode, forced := s.rcodes[name]
	switch {
	case silent || handler != nil:
	case forced:
		reply.Rcode = rcode
	case network == "udp" && s.truncate[name]:
		reply.Truncated = true
	default:
		reply.Rcode, reply.Answer = s.resolve(name, q.Qtype)
		// A validating resolver sets AD only for a client that asks
		// for it with DO or AD (RFC 6840 §5.7).
		reply.AuthenticatedData = s.ad && (opt != nil && opt.Do() || req.AuthenticatedData)
	}
	s.mu.Unlock()

	switch {
	case silent:
		return
	case handler != nil:
		if custom := handler(req); custom != nil {
			_ = w.WriteMsg(custom)
		}
		return
	}
	if opt != nil {
		reply.SetEdns0(ednsUDPSize, opt.Do())
	}
	if network == "udp" {
		size := dns.MinMsgSize
		if opt != nil {
			size = int(opt.UDPSize())
		}
		reply.Truncate(size)
	}
	_ = w.WriteMsg(reply)
}

// resolve answers like a recursive resolver: the records of name and
// qtype, or the CNAME chain from name followed within the zone (stopping
// at a loop, a SetNoChase name or after 16 steps) with the target's
// records. A name without records whose subdomains have some is an empty
// non-terminal: NODATA, not NXDOMAIN. Called with s.mu held.
func (s *testDNSServer) resolve(name string, qtype uint16) (int, []dns.RR) {
	var answer []dns.RR
	seen := map[string]bool{name: true}
	for range 16 {
		if rrs := s.records[testDNSKey{name, qtype}]; len(rrs) > 0 {
			return dns.RcodeSuccess, append(answer, copyRRs(rrs)...)
		}
		cnames := s.records[testDNSKey{name, dns.TypeCNAME}]
		if len(cnames) == 0 || qtype == dns.TypeCNAME {
			break
		}
		answer = append(answer, copyRRs(cnames)...)
		target := dns.CanonicalName(cnames[0].(*dns.CNAME).Target)
		if s.noChase[name] || seen[target] {
			return dns.RcodeSuccess, answer
		}
		seen[target] = true
		name = target
	}
	if s.exists(name) {
		return dns.RcodeSuccess, answer
	}
	return dns.RcodeNameError, answer
}

// exists reports whether name owns records or is an ancestor of an owner.
// Called with s.mu held.
func (s *testDNSServer) exists(name string) bool {
	for k := range s.records {
		if k.name == name || strings.HasSuffix(k.name, "."+name) {
			return true
		}
	}
	return false
}

// copyRRs returns deep copies, so that packing a reply never shares
// records with the zone or with another reply.
func copyRRs(rrs []dns.RR) []dns.RR {
	out := make([]dns.RR, len(rrs))
	for i, rr := range rrs {
		out[i] = dns.Copy(rr)
	}
	return out
}
