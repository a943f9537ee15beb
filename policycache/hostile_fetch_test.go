package policycache

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"

	"stsmap/internal/fixture"
	"stsmap/resolver"
)

// Hostile policy hosts meet the cache (issue 8), through a real
// resolver.Fetcher: resolver's TestFetchHostile checks the error class of
// each host, these tests check what the cache makes of it. SPEC 6.3: with
// nothing cached, the domain has no policy (policymap answers NOTFOUND)
// within the first-contact deadline. SPEC 6.3, 6.4: a cached policy
// survives a refresh that meets the hostile host.

const (
	hostileFetchDomain       = "example.com"
	hostileFetchFirstContact = time.Second
	hostileFetchTimeout      = 1500 * time.Millisecond
	// hostileFetchSlack is what a step may take beyond its deadline on a
	// busy machine.
	hostileFetchSlack = 2 * time.Second
)

// hostileFetchHosts are the hostile policy hosts (a compact copy of
// resolver's). slow: the fetch runs until its deadline.
var hostileFetchHosts = []struct {
	name  string
	serve http.HandlerFunc // nil: accepts TCP and never speaks TLS
	tls10 bool             // TLS 1.0 only
	slow  bool
}{
	{name: "body trickled one byte per second", slow: true, serve: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			if _, err := io.WriteString(w, "v"); err != nil || http.NewResponseController(w).Flush() != nil {
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
			}
		}
	}},
	{name: "endless body", serve: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		lines := []byte(strings.Repeat("mx: mx.example.com\n", 1000))
		for {
			if _, err := w.Write(lines); err != nil {
				return
			}
		}
	}},
	{name: "1 MiB of response headers", serve: func(w http.ResponseWriter, r *http.Request) {
		for i := range 1024 {
			w.Header().Set(fmt.Sprintf("X-Pad-%04d", i), strings.Repeat("a", 1010))
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, fixture.PolicyBody("enforce", 86400, "evil.example"))
	}},
	{name: "redirect loop", serve: func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, r.URL.Path, http.StatusFound)
	}},
	{name: "TLS 1.0 only", tls10: true, serve: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, fixture.PolicyBody("enforce", 86400, "evil.example"))
	}},
	{name: "connection reset mid-body", serve: func(w http.ResponseWriter, r *http.Request) {
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		rw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\nversion: STSv1\r\n")
		rw.Flush()
		tcp := conn.(*tls.Conn).NetConn().(*net.TCPConn)
		tcp.SetLinger(0) // an RST, without a TLS close_notify
		tcp.Close()
	}},
	{name: "TCP without TLS", slow: true},
}

// startHostileFetchHost starts a policy host for mta-sts.example.com with
// serve as its handler (nil: startSilentHost), and returns its address; it
// stops when the test ends.
func startHostileFetchHost(t *testing.T, ca *fixture.CA, serve http.HandlerFunc, tls10 bool) string {
	t.Helper()
	if serve == nil {
		return startSilentHost(t)
	}
	srv := httptest.NewUnstartedServer(serve)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.MustLeaf(t, "mta-sts."+hostileFetchDomain)}}
	if tls10 {
		srv.TLS.MinVersion, srv.TLS.MaxVersion = tls.VersionTLS10, tls.VersionTLS10
	}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	return srv.Listener.Addr().String()
}

// startSilentHost accepts TCP connections and never sends a byte; it
// drops what it reads until the client hangs up.
func startSilentHost(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				io.Copy(io.Discard, c)
				c.Close()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// hostileFetchWorld is a DNS server publishing the domain's record and
// policy host, a policy host serving a valid policy, and a resolver whose
// Fetcher reaches whichever policy host the test points it at.
type hostileFetchWorld struct {
	dns    *fixture.DNS
	good   string
	target atomic.Pointer[string]
	src    *resolver.Resolver
}

func newHostileFetchWorld(t *testing.T, ca *fixture.CA) *hostileFetchWorld {
	t.Helper()
	w := &hostileFetchWorld{dns: fixture.NewDNS(t)}
	w.dns.Add(t, "mta-sts."+hostileFetchDomain+". 300 IN A 127.0.0.1")
	good := fixture.NewPolicyServer(t, ca)
	good.SetPolicy(hostileFetchDomain, fixture.PolicyBody("enforce", 86400, "mx.example.com"))
	w.good = good.Server.Listener.Addr().String()
	dnsClient := resolver.NewDNS([]string{w.dns.Addr}, time.Second)
	w.src = &resolver.Resolver{DNS: dnsClient, Fetcher: &resolver.Fetcher{
		Hosts:   dnsClient,
		RootCAs: ca.Pool,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, *w.target.Load())
		},
	}}
	return w
}

// publish sets the domain's TXT id and the policy host fetches reach.
func (w *hostileFetchWorld) publish(t *testing.T, id, host string) {
	t.Helper()
	w.dns.Remove("_mta-sts."+hostileFetchDomain, dns.TypeTXT)
	w.dns.Add(t, fmt.Sprintf(`_mta-sts.%s. 300 IN TXT "v=STSv1; id=%s"`, hostileFetchDomain, id))
	w.target.Store(&host)
}

func TestHostileFetchAnswer(t *testing.T) {
	ca := fixture.NewCA(t)
	w := newHostileFetchWorld(t, ca)
	for _, h := range hostileFetchHosts {
		// Started before the subtests' leak snapshots: a server-side
		// connection left open by the client shows as a leaked
		// goroutine.
		addr := startHostileFetchHost(t, ca, h.serve, h.tls10)
		cfg := Config{FirstContactTimeout: hostileFetchFirstContact, FetchTimeout: hostileFetchTimeout}

		t.Run(h.name+"/nothing cached", func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // after the cache closes
			w.publish(t, "1", addr)
			c := newTestCache(t, w.src, cfg)

			start := time.Now()
			e := c.Lookup(t.Context(), hostileFetchDomain)
			elapsed := time.Since(start)
			t.Logf("%s in %v: %s", e.Reason, elapsed.Round(time.Millisecond), e.Err)
			want := ReasonFetchFailed
			if h.slow {
				want = ReasonPending // the discovery goes on until Close
			}
			if e.Policy != nil || e.Reason != want {
				t.Errorf("Lookup: got reason %q with policy %v, want %q without a policy", e.Reason, e.Policy, want)
			}
			if limit := hostileFetchFirstContact + hostileFetchSlack; elapsed > limit {
				t.Errorf("Lookup took %v, want at most %v", elapsed, limit)
			}
		})

		t.Run(h.name+"/policy cached", func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
			w.publish(t, "1", w.good)
			c := newTestCache(t, w.src, cfg)
			cached := c.Lookup(t.Context(), hostileFetchDomain)
			if cached.Policy == nil || cached.ID != "1" {
				t.Fatalf("first lookup: got reason %q id %q (%s), want the policy of id 1", cached.Reason, cached.ID, cached.Err)
			}

			// A new id sends the refresh to the hostile host (SPEC 6.4).
			w.publish(t, "2", addr)
			start := time.Now()
			e, err := c.RefreshNow(t.Context(), hostileFetchDomain)
			elapsed := time.Since(start)
			if err != nil {
				t.Fatalf("RefreshNow: %v", err)
			}
			t.Logf("refresh in %v: kept id %q, failed id %q", elapsed.Round(time.Millisecond), e.ID, e.FailedID)
			if e.Policy != cached.Policy || e.ID != "1" || e.FailedID != "2" || !e.Expires.Equal(cached.Expires) {
				t.Errorf("after the refresh: got %+v, want the cached policy kept until it expires and id 2 recorded as failed", e)
			}
			if got := c.Lookup(t.Context(), hostileFetchDomain); got.Policy != cached.Policy {
				t.Errorf("lookup after the refresh: got reason %q, want the cached policy", got.Reason)
			}
			if limit := hostileFetchTimeout + hostileFetchSlack; elapsed > limit {
				t.Errorf("RefreshNow took %v, want at most %v", elapsed, limit)
			}
		})
	}
}
