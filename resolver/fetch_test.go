package resolver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"stsmap/internal/fixture"
)

const (
	testFetchDomain = "example.com"
	testFetchHost   = "mta-sts.example.com"
)

// testFetchAddr is what fakeHosts resolves the policy host to; the dial
// hook sends a dial to it to the httptest server instead.
var testFetchAddr = netip.MustParseAddr("192.0.2.10")

// fakeHosts is a HostResolver with fixed answers that records its queries.
type fakeHosts struct {
	addrs []netip.Addr
	err   error

	mu    sync.Mutex
	asked []string
}

var _ HostResolver = (*fakeHosts)(nil)

func (h *fakeHosts) LookupHost(ctx context.Context, host string) ([]netip.Addr, error) {
	h.mu.Lock()
	h.asked = append(h.asked, host)
	h.mu.Unlock()
	return h.addrs, h.err
}

func (h *fakeHosts) Asked() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.asked)
}

// fetchTest is one Fetcher wired to one TLS httptest server.
type fetchTest struct {
	srv     *httptest.Server
	fetcher *Fetcher
	hosts   *fakeHosts

	mu     sync.Mutex
	dialed []string
}

// fetchTestCerts are the certificates the fetch tests choose from, made
// once: creating keys is the slow part.
type fetchTestCerts struct {
	ca                                  *fixture.CA
	good, untrusted, wrongName, expired tls.Certificate
	selfSigned                          tls.Certificate
}

var (
	fetchCertsOnce sync.Once
	fetchCerts     fetchTestCerts
)

func testFetchCerts(t *testing.T) *fetchTestCerts {
	t.Helper()
	fetchCertsOnce.Do(func() {
		ca := fixture.NewCA(t)
		other := fixture.NewCA(t)
		fetchCerts = fetchTestCerts{
			ca:         ca,
			good:       ca.MustLeaf(t, testFetchHost),
			untrusted:  other.MustLeaf(t, testFetchHost),
			wrongName:  ca.MustLeaf(t, "mta-sts.example.org", "example.com"),
			expired:    ca.ExpiredLeaf(t, testFetchHost),
			selfSigned: fixture.SelfSigned(t, testFetchHost),
		}
	})
	return &fetchCerts
}

// newFetchTest starts a TLS server with cert and handler, and a Fetcher
// that resolves testFetchHost to testFetchAddr and dials the server in its
// place. configure, if not nil, adjusts the server's TLS config.
func newFetchTest(t *testing.T, handler http.Handler, cert tls.Certificate, configure func(*tls.Config)) *fetchTest {
	t.Helper()
	ft := &fetchTest{hosts: &fakeHosts{addrs: []netip.Addr{testFetchAddr}}}
	ft.srv = httptest.NewUnstartedServer(handler)
	ft.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	if configure != nil {
		configure(ft.srv.TLS)
	}
	// Failed handshakes are the point of several tests; keep them quiet.
	ft.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	ft.srv.StartTLS()
	t.Cleanup(ft.srv.Close)

	ft.fetcher = &Fetcher{
		Hosts:       ft.hosts,
		RootCAs:     testFetchCerts(t).ca.Pool,
		DialContext: ft.dial,
	}
	return ft
}

// dial is the Fetcher's DialContext: it accepts only "<testFetchAddr>:443"
// and connects to the test server instead.
func (ft *fetchTest) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ft.mu.Lock()
	ft.dialed = append(ft.dialed, addr)
	ft.mu.Unlock()
	if want := net.JoinHostPort(testFetchAddr.String(), "443"); network != "tcp" || addr != want {
		return nil, fmt.Errorf("test dialer: refused %s %s, want tcp %s", network, addr, want)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", ft.srv.Listener.Addr().String())
}

func (ft *fetchTest) Dialed() []string {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return slices.Clone(ft.dialed)
}

// servePolicy answers every request with body and the content type ct
// ("" sends none).
func servePolicy(ct, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if ct == "" {
			// Without this, net/http sniffs one.
			w.Header()["Content-Type"] = nil
		} else {
			w.Header().Set("Content-Type", ct)
		}
		io.WriteString(w, body)
	}
}

// serveSized answers with body, declaring its length or, when chunked,
// flushing after the first byte so net/http uses chunked encoding.
func serveSized(body string, chunked bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		if !chunked {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			io.WriteString(w, body)
			return
		}
		io.WriteString(w, body[:1])
		w.(http.Flusher).Flush()
		io.WriteString(w, body[1:])
	}
}

// policyOfSize returns testPolicy padded with an extension line to exactly
// n bytes.
func policyOfSize(n int) string {
	const prefix = "pad: "
	return testPolicy + prefix + strings.Repeat("a", n-len(testPolicy)-len(prefix)-1) + "\n"
}

// wantFetchError checks a failed Fetch: nil policy, the sentinel, the
// class, a substring of the message and a bounded length (SPEC 8.3).
func wantFetchError(t *testing.T, p *Policy, err error, sentinel error, class, contains string) {
	t.Helper()
	if err == nil {
		t.Fatalf("Fetch: got policy %+v, want an error of class %q", p, class)
	}
	if p != nil {
		t.Errorf("Fetch: got policy %+v along with error %v", p, err)
	}
	if !errors.Is(err, sentinel) {
		t.Errorf("got error %v, want one matching %v", err, sentinel)
	}
	if other := map[error]error{ErrFetch: ErrInvalidPolicy, ErrInvalidPolicy: ErrFetch}[sentinel]; errors.Is(err, other) {
		t.Errorf("got error %v matching %v too, want only %v", err, other, sentinel)
	}
	if got := FetchErrorClass(err); got != class {
		t.Errorf("FetchErrorClass(%v) = %q, want %q", err, got, class)
	}
	if !strings.Contains(err.Error(), contains) {
		t.Errorf("got error %q, want it to contain %q", err, contains)
	}
	if got, limit := len(err.Error()), 300; got > limit {
		t.Errorf("got an error of %d bytes, want at most %d: %q", got, limit, err)
	}
}

func TestFetchValid(t *testing.T) {
	var (
		mu  sync.Mutex
		got *http.Request
	)
	ft := newFetchTest(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = r
		mu.Unlock()
		servePolicy("text/plain", testPolicy)(w, r)
	}), testFetchCerts(t).good, nil)

	p, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	checkPolicy(t, p, policyOf(ModeEnforce, day, "mail.example.com"))
	if got, want := ft.hosts.Asked(), []string{testFetchHost}; !slices.Equal(got, want) {
		t.Errorf("resolved %q, want %q", got, want)
	}
	if got, want := ft.Dialed(), []string{"192.0.2.10:443"}; !slices.Equal(got, want) {
		t.Errorf("dialed %q, want %q", got, want)
	}

	// SPEC 4.1 to 4.3: what the server saw.
	mu.Lock()
	defer mu.Unlock()
	checks := []struct {
		what      string
		got, want any
	}{
		{"method", got.Method, http.MethodGet},
		{"path", got.URL.Path, "/.well-known/mta-sts.txt"},
		{"host header", got.Host, testFetchHost},
		{"SNI", got.TLS.ServerName, testFetchHost},
		{"TLS 1.2 or newer", got.TLS.Version >= tls.VersionTLS12, true},
		{"Accept-Encoding", got.Header.Get("Accept-Encoding"), ""},
		{"conditional request", got.Header.Get("If-None-Match") + got.Header.Get("If-Modified-Since"), ""},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.what, c.got, c.want)
		}
	}
}

func TestFetch(t *testing.T) {
	certs := testFetchCerts(t)
	tests := []struct {
		name      string
		handler   http.Handler
		cert      tls.Certificate // zero: certs.good
		configure func(*tls.Config)
		// wantErr is nil for a successful fetch of testPolicy.
		wantErr   error
		wantClass string
		// wantText is a substring of the error.
		wantText string
	}{
		{name: "text/plain", handler: servePolicy("text/plain", testPolicy)},
		{name: "charset parameter", handler: servePolicy("text/plain; charset=utf-8", testPolicy)},
		{name: "uppercase media type", handler: servePolicy("TEXT/PLAIN", testPolicy)},
		{name: "malformed parameter ignored", handler: servePolicy("text/plain; charset", testPolicy)},
		{name: "text/html", handler: servePolicy("text/html", testPolicy),
			wantErr: ErrFetch, wantClass: "content_type", wantText: `content type "text/html", want text/plain`},
		{name: "missing content type", handler: servePolicy("", testPolicy),
			wantErr: ErrFetch, wantClass: "content_type", wantText: "no content type"},
		{name: "unparsable content type", handler: servePolicy("text/", testPolicy),
			wantErr: ErrFetch, wantClass: "content_type", wantText: "content type"},
		{name: "long content type cut", handler: servePolicy("text/x-"+strings.Repeat("a", 5000), testPolicy),
			wantErr: ErrFetch, wantClass: "content_type", wantText: "aaa...\", want text/plain"},
		{name: "404", handler: http.NotFoundHandler(),
			wantErr: ErrFetch, wantClass: "status", wantText: "mta-sts.example.com: status 404 Not Found"},
		{name: "500", handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) }),
			wantErr: ErrFetch, wantClass: "status", wantText: "status 500"},
		{name: "204", handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }),
			wantErr: ErrFetch, wantClass: "status", wantText: "status 204"},
		{name: "body of 65536 bytes declared", handler: serveSized(policyOfSize(MaxPolicySize), false)},
		{name: "body of 65536 bytes chunked", handler: serveSized(policyOfSize(MaxPolicySize), true)},
		{name: "body of 65537 bytes declared", handler: serveSized(policyOfSize(MaxPolicySize+1), false),
			wantErr: ErrFetch, wantClass: "too_large", wantText: "declared body of 65537 bytes"},
		{name: "body of 65537 bytes chunked", handler: serveSized(policyOfSize(MaxPolicySize+1), true),
			wantErr: ErrFetch, wantClass: "too_large", wantText: "body larger than 65536 bytes"},
		{name: "untrusted certificate", handler: servePolicy("text/plain", testPolicy), cert: certs.untrusted,
			wantErr: ErrFetch, wantClass: "tls", wantText: "unknown authority"},
		{name: "self-signed certificate", handler: servePolicy("text/plain", testPolicy), cert: certs.selfSigned,
			wantErr: ErrFetch, wantClass: "tls", wantText: "unknown authority"},
		{name: "wrong-name certificate", handler: servePolicy("text/plain", testPolicy), cert: certs.wrongName,
			wantErr: ErrFetch, wantClass: "tls", wantText: "not mta-sts.example.com"},
		{name: "expired certificate", handler: servePolicy("text/plain", testPolicy), cert: certs.expired,
			wantErr: ErrFetch, wantClass: "tls", wantText: "expired"},
		{name: "TLS 1.1 server", handler: servePolicy("text/plain", testPolicy),
			configure: func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS11 },
			wantErr:   ErrFetch, wantClass: "tls", wantText: "protocol version"},
		{name: "invalid policy", handler: servePolicy("text/plain", withLine("mode", "mode: Enforce")),
			wantErr: ErrInvalidPolicy, wantClass: "invalid_policy", wantText: `resolver: invalid MTA-STS policy: mta-sts.example.com: line 2: mode "Enforce"`},
		{name: "informational responses first", handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			w.WriteHeader(http.StatusEarlyHints)
			servePolicy("text/plain", testPolicy)(w, r)
		})},
		{name: "the request asked", handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// SPEC 4.1, 4.3: a plain GET of the policy path on the policy
			// host, asking for no compression and no keep-alive.
			if r.Method != http.MethodGet || r.Host != testFetchHost || r.URL.String() != "/.well-known/mta-sts.txt" ||
				r.Header.Get("Accept-Encoding") != "" || !r.Close || r.ProtoMajor != 1 || r.ProtoMinor != 1 {
				http.Error(w, "unexpected request", http.StatusBadRequest)
				return
			}
			servePolicy("text/plain", testPolicy)(w, r)
		})},
		{name: "empty body", handler: servePolicy("text/plain", ""),
			wantErr: ErrInvalidPolicy, wantClass: "invalid_policy", wantText: "empty policy"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cert := tc.cert
			if cert.Certificate == nil {
				cert = certs.good
			}
			ft := newFetchTest(t, tc.handler, cert, tc.configure)
			p, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
			if tc.wantErr != nil {
				wantFetchError(t, p, err, tc.wantErr, tc.wantClass, tc.wantText)
				return
			}
			if err != nil {
				t.Fatalf("Fetch: %v", err)
			}
			checkPolicy(t, p, policyOf(ModeEnforce, day, "mail.example.com"))
		})
	}
}

// TestFetchRedirectRefused serves a valid policy at the redirect target:
// the fetch must fail all the same, without asking for it (SPEC 4.3).
func TestFetchRedirectRefused(t *testing.T) {
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			var targetHits atomic.Int32
			mux := http.NewServeMux()
			mux.HandleFunc("/.well-known/mta-sts.txt", func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, "/policy.txt", code)
			})
			mux.HandleFunc("/policy.txt", func(w http.ResponseWriter, r *http.Request) {
				targetHits.Add(1)
				servePolicy("text/plain", testPolicy)(w, r)
			})
			ft := newFetchTest(t, mux, testFetchCerts(t).good, nil)

			p, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
			wantFetchError(t, p, err, ErrFetch, "redirect", fmt.Sprintf("redirect refused (status %d)", code))
			if n := targetHits.Load(); n != 0 {
				t.Errorf("redirect target fetched %d times, want 0", n)
			}
		})
	}
}

func TestFetchHostResolution(t *testing.T) {
	refused := netip.MustParseAddr("192.0.2.1")
	tests := []struct {
		name       string
		addrs      []netip.Addr
		err        error
		wantDialed []string
		wantClass  string // "" for success
		wantText   string
	}{
		{name: "resolver failure", err: errors.New("SERVFAIL from 127.0.0.53"),
			wantClass: "dns", wantText: "mta-sts.example.com: SERVFAIL from 127.0.0.53"},
		{name: "no addresses", wantClass: "dns", wantText: "no addresses"},
		{name: "first address refused, second answers", addrs: []netip.Addr{refused, testFetchAddr},
			wantDialed: []string{"192.0.2.1:443", "192.0.2.10:443"}},
		{name: "IPv4-mapped address unmapped", addrs: []netip.Addr{netip.AddrFrom16(testFetchAddr.As16())},
			wantDialed: []string{"192.0.2.10:443"}},
		{name: "IPv6 address", addrs: []netip.Addr{netip.MustParseAddr("2001:db8::1"), testFetchAddr},
			wantDialed: []string{"[2001:db8::1]:443", "192.0.2.10:443"}},
		{name: "all addresses refused", addrs: []netip.Addr{refused, netip.MustParseAddr("192.0.2.2")},
			wantDialed: []string{"192.0.2.1:443", "192.0.2.2:443"},
			wantClass:  "connect", wantText: "2 addresses, none answered; last: test dialer: refused tcp 192.0.2.2:443"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ft := newFetchTest(t, servePolicy("text/plain", testPolicy), testFetchCerts(t).good, nil)
			ft.hosts.addrs, ft.hosts.err = tc.addrs, tc.err

			p, err := ft.fetcher.Fetch(t.Context(), testFetchDomain)
			wantFetchOutcome(t, ft, p, err, tc.wantClass, tc.wantText, tc.wantDialed)
		})
	}
}

// wantFetchOutcome checks a fetch's result against a table case: a
// FetchErrorClass wantClass whose text contains wantText ("" for a
// successful fetch), and the addresses dialled, in order.
func wantFetchOutcome(t *testing.T, ft *fetchTest, p *Policy, err error, wantClass, wantText string, wantDialed []string) {
	t.Helper()
	if wantClass != "" {
		wantFetchError(t, p, err, ErrFetch, wantClass, wantText)
	} else if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got := ft.Dialed(); !slices.Equal(got, wantDialed) {
		t.Errorf("dialed %q, want %q", got, wantDialed)
	}
}

// TestFetchDeadline: ctx bounds a server that accepts the request and
// never answers.
func TestFetchDeadline(t *testing.T) {
	release := make(chan struct{})
	ft := newFetchTest(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}), testFetchCerts(t).good, nil)
	// Cleanups run last-in first-out: release the handler before the
	// server's Close waits for it.
	t.Cleanup(func() { close(release) })

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	p, err := ft.fetcher.Fetch(ctx, testFetchDomain)
	wantFetchError(t, p, err, ErrFetch, "timeout", "deadline exceeded")
	if ctx.Err() == nil {
		t.Errorf("Fetch returned before ctx expired: %v", err)
	}
}

// TestFetchDeadlineInHandshake: a listener that accepts and never speaks
// TLS; the error names the step.
func TestFetchDeadlineInHandshake(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		// Hold every connection open, silent, until the listener closes.
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, conn)
		}
	}()
	f := &Fetcher{
		Hosts: &fakeHosts{addrs: []netip.Addr{testFetchAddr}},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, ln.Addr().String())
		},
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	p, err := f.Fetch(ctx, testFetchDomain)
	wantFetchError(t, p, err, ErrFetch, "timeout", "deadline exceeded")
}

// TestFetchIgnoresProxyEnv: with HTTPS_PROXY pointing nowhere, the fetch
// still goes straight to the policy host (SPEC 4.3).
func TestFetchIgnoresProxyEnv(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:9")
	t.Setenv("https_proxy", "http://127.0.0.1:9")
	t.Setenv("NO_PROXY", "")
	ft := newFetchTest(t, servePolicy("text/plain", testPolicy), testFetchCerts(t).good, nil)

	if _, err := ft.fetcher.Fetch(t.Context(), testFetchDomain); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
}

func TestFetchInvalidDomain(t *testing.T) {
	for _, domain := range []string{"", "example.com.", "exa mple.com", "example.com/x", "user@example.com", "example.com:8443", "bücher.example", longName(250)} {
		hosts := &fakeHosts{addrs: []netip.Addr{testFetchAddr}}
		f := &Fetcher{Hosts: hosts, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			t.Errorf("dialed %s for domain %q", addr, domain)
			return nil, errors.New("no")
		}}
		p, err := f.Fetch(t.Context(), domain)
		wantFetchError(t, p, err, ErrFetch, "other", "invalid domain")
		if got := hosts.Asked(); len(got) != 0 {
			t.Errorf("domain %q: resolved %q, want no lookup", domain, got)
		}
	}
}

func TestFetchErrorClass(t *testing.T) {
	_, parseErr := ParsePolicy([]byte("garbage"))
	fetchErr := newFetchError("tls", testFetchHost, "x509: certificate signed by unknown authority")
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, ""},
		{"unrelated", errors.New("boom"), "other"},
		{"bare ErrFetch", ErrFetch, "other"},
		{"ParsePolicy error", parseErr, "invalid_policy"},
		{"fetch error", fetchErr, "tls"},
		{"wrapped fetch error", fmt.Errorf("refresh example.com: %w", fetchErr), "tls"},
	}
	for _, tc := range tests {
		if got := FetchErrorClass(tc.err); got != tc.want {
			t.Errorf("%s: FetchErrorClass(%v) = %q, want %q", tc.name, tc.err, got, tc.want)
		}
	}
}

func TestFetchClip(t *testing.T) {
	tests := []struct {
		in   string
		n    int
		want string
	}{
		{"text/html", 100, "text/html"},
		{"abcdef", 3, "abc..."},
		{"a\x00b\nc\xff", 100, "a?b?c?"},
		{"ééé", 5, "éé..."},
		{"\u2028x", 100, "?x"},
	}
	for _, tc := range tests {
		if got := fetchClip(tc.in, tc.n); got != tc.want {
			t.Errorf("fetchClip(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}

// SPEC 2.2, 4.1, 4.2: a domain given in upper case is fetched from the
// lowercase policy host, which is also the name resolved and the SNI.
func TestFetchLowercasesDomain(t *testing.T) {
	var (
		mu  sync.Mutex
		sni string
	)
	ft := newFetchTest(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		sni = r.TLS.ServerName
		mu.Unlock()
		servePolicy("text/plain", testPolicy)(w, r)
	}), testFetchCerts(t).good, nil)
	if _, err := ft.fetcher.Fetch(t.Context(), strings.ToUpper(testFetchDomain)); err != nil {
		t.Fatalf("Fetch(%q): %v", strings.ToUpper(testFetchDomain), err)
	}
	if got, want := ft.hosts.Asked(), []string{testFetchHost}; !slices.Equal(got, want) {
		t.Errorf("resolved %q, want %q", got, want)
	}
	mu.Lock()
	defer mu.Unlock()
	if sni != testFetchHost {
		t.Errorf("SNI: got %q, want %q", sni, testFetchHost)
	}
}
