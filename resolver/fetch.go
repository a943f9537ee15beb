package resolver

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// HostResolver resolves the policy host through the configured nameservers
// (SPEC 4.1: never Go's default resolver). *DNS implements it.
type HostResolver interface {
	LookupHost(ctx context.Context, host string) ([]netip.Addr, error)
}

// Fetcher fetches MTA-STS policies over HTTPS (RFC 8461 §3.3, SPEC section
// 4). Set its fields before the first Fetch and leave them alone after: the
// HTTP client is built once, on first use, and reused. A Fetcher is safe for
// concurrent use.
type Fetcher struct {
	// Hosts resolves mta-sts.<domain>. Required.
	Hosts HostResolver
	// RootCAs verifies the policy host; nil means the system roots (Go
	// honours SSL_CERT_FILE / SSL_CERT_DIR) (SPEC 4.2).
	RootCAs *x509.CertPool
	// DialContext dials a resolved address "ip:443"; nil means a
	// net.Dialer. Tests use it to reach an httptest server.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
}

const (
	// policyHostPrefix and policyPath make the policy URL (RFC 8461 §3.3).
	policyHostPrefix = "mta-sts."
	policyPath       = "/.well-known/mta-sts.txt"
	policyPort       = "443" // SPEC 4.1
	// fetchMaxHeaderBytes bounds the response header; a policy host
	// has no reason to send more, and a fetch that meets more fails as
	// too_large.
	fetchMaxHeaderBytes = 16 << 10
	// fetchFallbackTimeout bounds a Fetch whose ctx has no deadline, so
	// a caller's mistake cannot hang a fetch forever (SPEC 4.6: background
	// fetches get about 30 to 60 s). Callers are expected to set their own.
	fetchFallbackTimeout = 60 * time.Second
	// fetchMinDialAttempt is the least time one address gets when the
	// remaining time is shared among several (as net.Dialer does).
	fetchMinDialAttempt = 2 * time.Second
	// maxFetchDetail bounds the detail of a fetch error (SPEC 8.3).
	maxFetchDetail = 200
	// maxFetchRemoteText bounds a remote string, such as a Content-Type,
	// inside that detail.
	maxFetchRemoteText = 100
)

// FetchErrorClass tokens.
const (
	fetchClassDNS           = "dns"
	fetchClassConnect       = "connect"
	fetchClassTLS           = "tls"
	fetchClassTimeout       = "timeout"
	fetchClassStatus        = "status"
	fetchClassRedirect      = "redirect"
	fetchClassContentType   = "content_type"
	fetchClassTooLarge      = "too_large"
	fetchClassInvalidPolicy = "invalid_policy"
	fetchClassOther         = "other"
)

// fetchError is a Fetch failure: it matches ErrFetch, or ErrInvalidPolicy
// for a body that does not parse, and nothing else. The underlying error is
// summarised in detail (bounded, SPEC 8.3) but not wrapped, so that, for
// example, a failed lookup of the policy host is not mistaken for a failed
// TXT discovery (ErrDNS, SPEC 3.4).
type fetchError struct {
	sentinel error
	class    string
	host     string
	detail   string
}

func (e *fetchError) Error() string {
	return e.sentinel.Error() + ": " + e.host + ": " + e.detail
}

func (e *fetchError) Unwrap() error { return e.sentinel }

func newFetchError(class, host, detail string) *fetchError {
	return &fetchError{sentinel: ErrFetch, class: class, host: host, detail: fetchClip(detail, maxFetchDetail)}
}

// FetchErrorClass returns a fixed token naming why a Fetch failed, for
// metrics and status output: "dns", "connect", "tls", "timeout", "status",
// "redirect", "content_type", "too_large", "invalid_policy" or "other".
// It returns "" for a nil error.
func FetchErrorClass(err error) string {
	if err == nil {
		return ""
	}
	if fe, ok := errors.AsType[*fetchError](err); ok {
		return fe.class
	}
	if errors.Is(err, ErrInvalidPolicy) {
		return fetchClassInvalidPolicy
	}
	return fetchClassOther
}

// Fetch GETs https://mta-sts.<domain>/.well-known/mta-sts.txt and parses it
// (RFC 8461 §3.3, SPEC sections 4 and 5). domain is an A-label without a
// trailing dot (SPEC 2.2); anything else fails before any I/O. Failures
// wrap ErrFetch; a body that does not parse wraps ErrInvalidPolicy (SPEC 5.5
// counts both as a failed fetch). ctx bounds the whole fetch: lookup,
// connect, handshake, headers and body; without a deadline, Fetch applies
// one of 60 s.
func (f *Fetcher) Fetch(ctx context.Context, domain string) (*Policy, error) {
	host := policyHostPrefix + strings.ToLower(domain)
	if reason := checkLDHName(host); reason != "" {
		return nil, newFetchError(fetchClassOther, fetchClip(host, maxFetchRemoteText), "invalid domain: "+reason)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, fetchFallbackTimeout)
		defer cancel()
	}
	conn, err := f.dialTLS(ctx, host)
	if err != nil {
		return nil, classifyFetchError(ctx, host, "", err)
	}
	// Closing the connection ends the response; its body is never
	// closed, which would read an endless one to its end.
	defer conn.Close()
	// SPEC 4.6: ctx bounds every read and write: when it ends (its
	// deadline or a cancellation), a blocked one ends at once. Not a
	// deadline on conn, which could fire a moment before ctx ends and be
	// taken for another failure.
	defer context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })()
	resp, err := getPolicy(conn, host)
	if err != nil {
		return nil, classifyFetchError(ctx, host, "", err)
	}

	// SPEC 4.3: no redirects (a 3xx is never followed), only 200.
	// Go's own status text, not the server's, so no remote text is logged.
	switch code := resp.StatusCode; {
	case code >= 300 && code < 400:
		return nil, newFetchError(fetchClassRedirect, host, fmt.Sprintf("redirect refused (status %d)", code))
	case code != http.StatusOK:
		return nil, newFetchError(fetchClassStatus, host, strings.TrimSpace(fmt.Sprintf("status %d %s", code, http.StatusText(code))))
	}

	// SPEC 4.4: the media type must be text/plain, case-insensitive,
	// parameters ignored (even malformed ones).
	ct := resp.Header.Get("Content-Type")
	if ct == "" {
		return nil, newFetchError(fetchClassContentType, host, "no content type, want text/plain")
	}
	mediaType, _, err := mime.ParseMediaType(ct)
	if err != nil && !errors.Is(err, mime.ErrInvalidMediaParameter) || mediaType != "text/plain" {
		return nil, newFetchError(fetchClassContentType, host, "content type "+fetchQuote(ct)+", want text/plain")
	}

	// SPEC 4.5: at most MaxPolicySize bytes, declared or not; never
	// truncate. Reading one byte more tells a body that is too large.
	if resp.ContentLength > MaxPolicySize {
		return nil, newFetchError(fetchClassTooLarge, host, fmt.Sprintf("declared body of %d bytes, limit %d", resp.ContentLength, MaxPolicySize))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxPolicySize+1))
	if err != nil {
		return nil, classifyFetchError(ctx, host, "reading body: ", err)
	}
	if len(body) > MaxPolicySize {
		return nil, newFetchError(fetchClassTooLarge, host, fmt.Sprintf("body larger than %d bytes", MaxPolicySize))
	}
	// SPEC 4.5, 4.6: a body that ended only once ctx was done may have
	// been cut short in answer to our own hang-up (when ctx ends, the
	// Transport closes the connection, sending a TLS close_notify first;
	// a server may answer it by ending its chunked body before the
	// socket is closed). It is a timeout, never a policy.
	if err := ctx.Err(); err != nil {
		return nil, classifyFetchError(ctx, host, "reading body: ", err)
	}

	p, err := ParsePolicy(body)
	if err != nil {
		detail := err.Error()
		if pe, ok := errors.AsType[*policyError](err); ok {
			detail = pe.detail()
		}
		return nil, &fetchError{sentinel: ErrInvalidPolicy, class: fetchClassInvalidPolicy, host: host, detail: fetchClip(detail, maxFetchDetail)}
	}
	return p, nil
}

// getPolicy sends the policy request on conn and reads the response head.
// It is a plain HTTP/1.1 exchange on the fetch's own goroutine, one per
// connection (policy hosts are many and rarely revisited): net/http's
// Transport would hand the dial, the request and the response between
// goroutines of its own, which on a first contact cost more than the
// exchange (issue 7). The body, identity or chunked as the server framed
// it, is read from resp.Body; no compression is asked for, so the size
// limit (SPEC 4.5) is on what the server sent.
func getPolicy(conn net.Conn, host string) (*http.Response, error) {
	// SPEC 4.3: no caching, no proxy; Connection: close, one request.
	if _, err := io.WriteString(conn, "GET "+policyPath+" HTTP/1.1\r\nHost: "+host+"\r\nUser-Agent: stsmap\r\nConnection: close\r\n\r\n"); err != nil {
		return nil, fmt.Errorf("sending the request: %w", err)
	}
	head := &headLimiter{r: conn, left: fetchMaxHeaderBytes}
	br := bufio.NewReader(head)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			if head.left <= 0 {
				return nil, &fetchStepError{class: fetchClassTooLarge, err: fmt.Errorf("response headers larger than %d bytes", fetchMaxHeaderBytes)}
			}
			return nil, err
		}
		// Informational responses (1xx) precede the real one, within
		// the same header budget.
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue
		}
		head.left = -1 // the body's limit is Fetch's
		return resp, nil
	}
}

// headLimiter reads from r at most left bytes, then reports EOF; a
// negative left reads without limit. It bounds the response head
// (fetchMaxHeaderBytes) read through a bufio.Reader, which may read ahead
// into the body.
type headLimiter struct {
	r    io.Reader
	left int
}

func (l *headLimiter) Read(p []byte) (int, error) {
	if l.left < 0 {
		return l.r.Read(p)
	}
	if l.left == 0 {
		return 0, io.EOF
	}
	if len(p) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= n
	return n, err
}

// fetchStepError marks a failure in dialTLS with its class, so that
// classifyFetchError can find it through the Transport's wrapping.
type fetchStepError struct {
	class string
	err   error
}

func (e *fetchStepError) Error() string { return e.err.Error() }

func (e *fetchStepError) Unwrap() error { return e.err }

// dialTLS resolves the policy host through Hosts, connects to port 443 of
// its addresses in order until one answers, and completes a TLS handshake
// verified for that host name (SPEC 4.1, 4.2), all within ctx (SPEC 4.6).
func (f *Fetcher) dialTLS(ctx context.Context, host string) (net.Conn, error) {
	conn, err := f.dialHost(ctx, host)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(conn, &tls.Config{
		// SPEC 4.2: TLS 1.2 or newer; SNI and DNS-ID are the policy
		// host; RootCAs nil means the system roots.
		MinVersion: tls.VersionTLS12,
		ServerName: host,
		RootCAs:    f.RootCAs,
	})
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, &fetchStepError{class: fetchClassTLS, err: err}
	}
	return tc, nil
}

// familyResolver is a HostResolver that can look up one address family at
// a time, as *DNS can.
type familyResolver interface {
	LookupFamily(ctx context.Context, host string, ipv6 bool) ([]netip.Addr, error)
}

var _ familyResolver = (*DNS)(nil)

// dialHost resolves host and connects to its addresses in the resolver's
// order, IPv4 first. With several addresses, each attempt gets a share of
// the time left, so one silent address does not use up ctx (as net.Dialer
// does). With a familyResolver the A and AAAA lookups run at once and the
// IPv4 addresses are tried as soon as they are known: the AAAA answer is
// waited for only when none of them answers, so a slow or lost AAAA reply
// (some resolvers and middleboxes drop them) does not delay the fetch.
func (f *Fetcher) dialHost(ctx context.Context, host string) (net.Conn, error) {
	if f.Hosts == nil {
		return nil, &fetchStepError{class: fetchClassDNS, err: errors.New("no host resolver configured")}
	}
	fr, ok := f.Hosts.(familyResolver)
	if !ok {
		addrs, err := f.Hosts.LookupHost(ctx, host)
		if err == nil && len(addrs) == 0 {
			err = errors.New("no addresses")
		}
		if err != nil {
			return nil, &fetchStepError{class: fetchClassDNS, err: err}
		}
		return f.dialAddrs(ctx, addrs, 0, 0)
	}
	type result struct {
		addrs []netip.Addr
		err   error
	}
	lctx, cancel := context.WithCancel(ctx) // ends the AAAA lookup with dialHost
	defer cancel()
	aaaa := make(chan result, 1)
	go func() {
		addrs, err := fr.LookupFamily(lctx, host, true)
		aaaa <- result{addrs, err}
	}()
	v4, err4 := fr.LookupFamily(ctx, host, false)
	var lastErr error // from the IPv4 addresses
	if len(v4) > 0 {
		// One attempt's worth of time is kept for the IPv6 addresses
		// that may follow.
		conn, err := f.dialAddrs(ctx, v4, 1, 0)
		if err == nil || ctx.Err() != nil {
			return conn, err
		}
		lastErr = err
	}
	var r6 result
	select {
	case r6 = <-aaaa:
	case <-ctx.Done():
		r6.err = ctx.Err()
	}
	if len(v4) == 0 {
		if _, err := joinFamilies(host, nil, err4, r6.addrs, r6.err); len(r6.addrs) == 0 {
			return nil, &fetchStepError{class: fetchClassDNS, err: err}
		}
	}
	if len(r6.addrs) == 0 {
		return nil, lastErr
	}
	return f.dialAddrs(ctx, r6.addrs, 0, len(v4))
}

// dialAddrs connects to the first of addrs (at least one) that answers.
// more is the number of attempts that may follow addrs (their share of the
// time left is kept for them); tried, the number of addresses tried before
// in vain, for the error text.
func (f *Fetcher) dialAddrs(ctx context.Context, addrs []netip.Addr, more, tried int) (net.Conn, error) {
	dial := f.DialContext
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	var lastErr error
	for i, a := range addrs {
		actx, cancel := fetchAttemptContext(ctx, len(addrs)-i+more)
		conn, err := dial(actx, "tcp", net.JoinHostPort(a.Unmap().String(), policyPort))
		cancel()
		if err == nil {
			return conn, nil
		}
		tried++
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	if tried > 1 {
		lastErr = fmt.Errorf("%d addresses, none answered; last: %w", tried, lastErr)
	}
	return nil, &fetchStepError{class: fetchClassConnect, err: lastErr}
}

// fetchAttemptContext gives one of the remaining dial attempts its share
// of ctx's time left, at least fetchMinDialAttempt (when that much is left).
func fetchAttemptContext(ctx context.Context, remaining int) (context.Context, context.CancelFunc) {
	deadline, ok := ctx.Deadline()
	if !ok || remaining <= 1 {
		return ctx, func() {}
	}
	left := time.Until(deadline)
	share := left / time.Duration(remaining)
	if share < fetchMinDialAttempt {
		share = min(fetchMinDialAttempt, left)
	}
	return context.WithTimeout(ctx, share)
}

// classifyFetchError turns an error from the client or the body read into a
// fetchError. ctx's own deadline takes precedence: whatever step it cut
// short, the fetch timed out.
func classifyFetchError(ctx context.Context, host, prefix string, err error) error {
	cause := err
	step, isStep := errors.AsType[*fetchStepError](err)
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		if isStep {
			return newFetchError(fetchClassTimeout, host, prefix+"deadline exceeded during "+step.class)
		}
		return newFetchError(fetchClassTimeout, host, prefix+"deadline exceeded")
	case ctx.Err() != nil:
		return newFetchError(fetchClassOther, host, prefix+"canceled")
	case isStep:
		return newFetchError(step.class, host, prefix+step.err.Error())
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return newFetchError(fetchClassTimeout, host, prefix+cause.Error())
	}
	return newFetchError(fetchClassOther, host, prefix+cause.Error())
}

// fetchQuote quotes a remote string inside an error detail: cut and
// escaped as fetchClip does, within double quotes.
func fetchQuote(s string) string {
	return `"` + fetchClip(s, maxFetchRemoteText) + `"`
}

// fetchClip makes s safe to log (SPEC 8.3): at most n bytes (then "..."),
// cut on a character boundary, with invalid UTF-8 and unprintable
// characters replaced by "?".
func fetchClip(s string, n int) string {
	var b strings.Builder
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			r = '?'
		}
		if b.Len()+utf8.RuneLen(r) > n {
			b.WriteString("...")
			break
		}
		b.WriteRune(r)
	}
	return b.String()
}
