package policycache

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"

	"stsmap/resolver"
)

// Hostile DNS meets the cache (issue 8), through the real resolver.DNS:
// resolver's TestHostileDNS checks the error class of each hostile answer,
// these tests check what the cache makes of it. SPEC 3.4, 6.3: with nothing
// cached, the domain has no policy (policymap answers NOTFOUND) within the
// first-contact deadline. SPEC 3.4, 6.4: a cached policy survives a refresh
// whose TXT lookup fails.

const hostileDomain = "example.com"

// hostileAnswers build the reply of a hostile resolver to a query; nil is
// silence.
var hostileAnswers = map[string]func(req *dns.Msg) *dns.Msg{
	"SERVFAIL": func(req *dns.Msg) *dns.Msg { return new(dns.Msg).SetRcode(req, dns.RcodeServerFailure) },
	"timeout":  func(req *dns.Msg) *dns.Msg { return nil },
	"CNAME loop": func(req *dns.Msg) *dns.Msg {
		q := req.Question[0].Name
		return answerWith(req, cnameRR(q, "a.loop.example."), cnameRR("a.loop.example.", q))
	},
	"20-step CNAME chain": func(req *dns.Msg) *dns.Msg {
		m := answerWith(req)
		owner := req.Question[0].Name
		for i := range 20 {
			target := fmt.Sprintf("c%d.chain.example.", i+1)
			m.Answer = append(m.Answer, cnameRR(owner, target))
			owner = target
		}
		m.Answer = append(m.Answer, txtRR(owner, "v=STSv1; id=end"))
		return m
	},
	"two valid records": func(req *dns.Msg) *dns.Msg {
		q := req.Question[0].Name
		return answerWith(req, txtRR(q, "v=STSv1; id=one"), txtRR(q, "v=STSv1; id=two"))
	},
	"records for another name": func(req *dns.Msg) *dns.Msg {
		return answerWith(req, txtRR("_mta-sts.example.com.evil.", "v=STSv1; id=evil"), txtRR("mta-sts.example.com.", "v=STSv1; id=evil"))
	},
}

func TestHostileDNSFirstContact(t *testing.T) {
	const firstContact = time.Second
	tests := []struct {
		answer     string
		dnsTimeout time.Duration // per attempt
		want       Reason
	}{
		{"SERVFAIL", time.Second, ReasonDNSFailure},
		{"timeout", 300 * time.Millisecond, ReasonDNSFailure},
		// The lookup stops waiting; the discovery goes on until Close.
		{"timeout", 3 * time.Second, ReasonPending},
		{"CNAME loop", time.Second, ReasonDNSFailure},
		{"20-step CNAME chain", time.Second, ReasonDNSFailure},
		{"two valid records", time.Second, ReasonInvalidRecord},
		{"records for another name", time.Second, ReasonNoRecord},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%v", tt.answer, tt.dnsTimeout), func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // after the cache and server close
			s := newSwitchDNS(t, hostileAnswers[tt.answer])
			src := newDNSSource(s, tt.dnsTimeout)
			c := newTestCache(t, src, Config{FirstContactTimeout: firstContact, FetchTimeout: 10 * time.Second, NegativeTTL: time.Minute})

			start := time.Now()
			e := c.Lookup(t.Context(), hostileDomain)
			elapsed := time.Since(start)
			t.Logf("%s in %v: %s", e.Reason, elapsed.Round(time.Millisecond), e.Err)
			if e.Policy != nil || e.Reason != tt.want {
				t.Errorf("Lookup: got reason %q with policy %v, want %q without a policy", e.Reason, e.Policy, tt.want)
			}
			// Generous: the deadline plus scheduling on a loaded machine.
			if limit := firstContact + time.Second; elapsed > limit {
				t.Errorf("Lookup took %v, want at most %v", elapsed, limit)
			}
			if n := src.fetches.Load(); n != 0 {
				t.Errorf("%d policy fetches, want none without a valid record", n)
			}
		})
	}
}

func TestHostileDNSRefreshKeepsPolicy(t *testing.T) {
	for _, answer := range []string{"SERVFAIL", "timeout", "CNAME loop", "20-step CNAME chain"} {
		t.Run(answer, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // after the cache and server close
			s := newSwitchDNS(t, func(req *dns.Msg) *dns.Msg {
				return answerWith(req, txtRR(req.Question[0].Name, "v=STSv1; id=id1"))
			})
			src := newDNSSource(s, 300*time.Millisecond)
			c := newTestCache(t, src, Config{FetchTimeout: 10 * time.Second})
			cached := c.Lookup(t.Context(), hostileDomain)
			if cached.Policy == nil || cached.ID != "id1" {
				t.Fatalf("first lookup: got reason %q id %q, want the policy of id1", cached.Reason, cached.ID)
			}

			s.set(hostileAnswers[answer])
			start := time.Now()
			e, err := c.RefreshNow(t.Context(), hostileDomain)
			elapsed := time.Since(start)
			if err != nil {
				t.Fatalf("RefreshNow: %v", err)
			}
			t.Logf("refresh in %v: failed at %v", elapsed.Round(time.Millisecond), e.FailedAt)
			// SPEC 3.4: discovery failed, the policy stays until it
			// expires; far from expiry, no HTTPS renewal (SPEC 6.4).
			if e.Policy != cached.Policy || e.ID != "id1" || !e.Expires.Equal(cached.Expires) || e.FailedAt.IsZero() {
				t.Errorf("after the refresh: got %+v, want the cached policy kept, its expiry unchanged and the failure recorded", e)
			}
			if got := c.Lookup(t.Context(), hostileDomain); got.Policy != cached.Policy {
				t.Errorf("lookup after the refresh: got reason %q, want the cached policy", got.Reason)
			}
			if elapsed > 5*time.Second {
				t.Errorf("RefreshNow took %v, want at most 5s", elapsed)
			}
			if n := src.fetches.Load(); n != 1 {
				t.Errorf("%d policy fetches, want 1 (the first discovery)", n)
			}
		})
	}
}

// dnsSource finds records with the real resolver.DNS and serves a fixed
// policy: HTTPS is not what these tests are about.
type dnsSource struct {
	*resolver.Resolver
	fetches atomic.Int32
}

func newDNSSource(s *switchDNS, timeout time.Duration) *dnsSource {
	return &dnsSource{Resolver: &resolver.Resolver{DNS: resolver.NewDNS([]string{s.addr}, timeout)}}
}

func (d *dnsSource) FetchPolicy(ctx context.Context, domain string) (*resolver.Policy, error) {
	d.fetches.Add(1)
	return &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: 24 * time.Hour, MX: []string{"mx.example.com"}}, nil
}

// switchDNS is a DNS server on 127.0.0.1 (UDP) whose answer the test
// switches while it runs. It stops in t.Cleanup.
type switchDNS struct {
	addr   string
	mu     sync.Mutex
	answer func(req *dns.Msg) *dns.Msg // nil reply: silence
}

func newSwitchDNS(t *testing.T, answer func(req *dns.Msg) *dns.Msg) *switchDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &switchDNS{addr: pc.LocalAddr().String(), answer: answer}
	started, done := make(chan struct{}), make(chan error, 1)
	srv := &dns.Server{PacketConn: pc, Handler: s, NotifyStartedFunc: func() { close(started) }}
	go func() { done <- srv.ActivateAndServe() }()
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("test DNS server: %v", err)
	}
	t.Cleanup(func() {
		_ = srv.Shutdown()
		<-done
	})
	return s
}

func (s *switchDNS) set(answer func(req *dns.Msg) *dns.Msg) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.answer = answer
}

func (s *switchDNS) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	s.mu.Lock()
	answer := s.answer
	s.mu.Unlock()
	if len(req.Question) != 1 {
		return
	}
	if m := answer(req); m != nil {
		_ = w.WriteMsg(m)
	}
}

// answerWith is the NOERROR reply to req with rrs in the answer section.
func answerWith(req *dns.Msg, rrs ...dns.RR) *dns.Msg {
	m := new(dns.Msg).SetReply(req)
	m.Answer = rrs
	return m
}

func txtRR(owner, text string) dns.RR {
	return &dns.TXT{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 300}, Txt: []string{text}}
}

func cnameRR(owner, target string) dns.RR {
	return &dns.CNAME{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: 300}, Target: target}
}
