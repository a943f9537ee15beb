package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"stsmap/internal/fixture"
)

// The synthetic domains of -fixture: d000001.bench.test and on, each with
// an enforce policy (issue 7: real cache hits over thousands of domains).
const (
	benchTLD      = "test"
	benchZone     = "bench." + benchTLD
	benchPolicyID = "20270101"
	benchMaxAge   = 86400
	// benchMXWildcard is the second mx pattern of every policy.
	benchMXWildcard = "*.mx." + benchZone
	// benchTTL is the TTL of the fixture's records; stsmap does not cache
	// DNS answers, so its value only matters to other clients.
	benchTTL = 3600
)

// benchDomain returns the i-th synthetic domain (i from 1).
func benchDomain(i int) string { return fmt.Sprintf("d%06d.%s", i, benchZone) }

// benchMX returns the mx patterns of a synthetic domain's policy, in the
// policy's order.
func benchMX(domain string) []string { return []string{"mx1." + domain, benchMXWildcard} }

// benchAnswer is what stsmap answers Postfix for a synthetic domain with
// the default map settings (SPEC 7.1).
func benchAnswer(domain string) string {
	return "secure match=mx1." + domain + ":" + strings.TrimPrefix(benchMXWildcard, "*") + " servername=hostname"
}

// fixtureOptions configures -fixture.
type fixtureOptions struct {
	domains   int
	dnsAddr   string // DNS listen address, UDP and TCP
	httpsAddr string // HTTPS listen address of the policy hosts
	dir       string // where ca.pem and the key files go
	// pregen issues every policy host's certificate before the fixture is
	// ready, so that no lookup pays for a key generation.
	pregen bool
}

// benchFixture is a DNS server and an HTTPS policy server publishing the
// synthetic domains, with their CA.
type benchFixture struct {
	DNS     *fixture.DNS
	CA      *fixture.CA
	Policy  *fixture.PolicyServer
	Domains []string
	// HTTPSAddr is the policy server's address, whatever the domains'
	// A records say.
	HTTPSAddr string

	t *fixtureT
}

// fixtureT is the fixture.T of a fixture that runs outside a test: a
// failure panics with a fixtureFailure, which startFixture recovers into an
// error, so that tests can run the fixture mode in-process.
type fixtureT struct {
	mu       sync.Mutex
	cleanups []func()
}

type fixtureFailure struct{ err error }

var _ fixture.T = (*fixtureT)(nil)

func (*fixtureT) Helper() {}

func (t *fixtureT) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

func (*fixtureT) Fatalf(format string, args ...any) {
	panic(fixtureFailure{fmt.Errorf(format, args...)})
}

// close runs the cleanups, last registered first.
func (t *fixtureT) close() {
	t.mu.Lock()
	c := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(c) - 1; i >= 0; i-- {
		c[i]()
	}
}

// startFixture starts the DNS and HTTPS fixtures and publishes
// o.domains synthetic domains. Close stops them.
func startFixture(o fixtureOptions) (*benchFixture, error) {
	if o.domains < 1 || o.domains > 999999 {
		return nil, fmt.Errorf("-domains %d: want 1 to 999999", o.domains)
	}
	t := &fixtureT{}
	fx := &benchFixture{t: t}
	err := catch(func() {
		fx.CA = fixture.NewCA(t)
		fx.DNS = fixture.NewDNSAt(t, o.dnsAddr)
		fx.Policy = fixture.NewPolicyServerAt(t, fx.CA, o.httpsAddr)
		fx.HTTPSAddr = fx.Policy.Server.Listener.Addr().String()
		fx.publish(o.domains)
	})
	if err == nil && o.pregen {
		err = fx.issueCertificates()
	}
	if err != nil {
		t.close()
		return nil, err
	}
	return fx, nil
}

// catch runs f and returns the error of a fixture failure in it.
func catch(f func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			ff, ok := r.(fixtureFailure)
			if !ok {
				panic(r)
			}
			err = ff.err
		}
	}()
	f()
	return nil
}

// publish publishes n synthetic domains: the _mta-sts TXT record, the
// policy host's address, an MX record (stsmap's DANE check asks for it)
// and the policy.
func (fx *benchFixture) publish(n int) {
	// The policy hosts resolve to the address the policy server listens
	// on (127.0.0.1 when it listens on every address).
	ip := fx.Policy.Server.Listener.Addr().(*net.TCPAddr).IP
	if ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	fx.Domains = make([]string, n)
	for i := range fx.Domains {
		d := benchDomain(i + 1)
		fx.Domains[i] = d
		fx.DNS.Add(fx.t,
			fmt.Sprintf(`_mta-sts.%s. %d IN TXT "v=STSv1; id=%s"`, d, benchTTL, benchPolicyID),
			fmt.Sprintf(`%s. %d IN MX 10 mx1.%s.`, d, benchTTL, d))
		if ip4 := ip.To4(); ip4 != nil {
			// The policy host has an AAAA record too, the same IPv4
			// server as an IPv4-mapped address: stsmap asks for A and
			// AAAA at once, and the DNS fixture answers a NODATA by
			// scanning every record it holds, which with thousands of
			// domains would time the fixture, not stsmap.
			fx.DNS.Add(fx.t,
				fmt.Sprintf(`mta-sts.%s. %d IN A %s`, d, benchTTL, ip4),
				fmt.Sprintf(`mta-sts.%s. %d IN AAAA ::ffff:%s`, d, benchTTL, ip4))
		} else {
			fx.DNS.Add(fx.t, fmt.Sprintf(`mta-sts.%s. %d IN AAAA %s`, d, benchTTL, ip))
		}
		fx.Policy.SetPolicy(d, fixture.PolicyBody("enforce", benchMaxAge, benchMX(d)...))
	}
}

// Close stops the fixture's servers.
func (fx *benchFixture) Close() { fx.t.close() }

// issueCertificates makes the policy server issue and cache the
// certificate of every policy host, by completing one TLS handshake per
// name: the server issues a name's certificate on its first handshake and
// keeps it.
func (fx *benchFixture) issueCertificates() error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, 2*runtime.GOMAXPROCS(0))
	for w := range errs {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(fx.Domains) {
					return
				}
				if err := fx.handshake("mta-sts." + fx.Domains[i]); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (fx *benchFixture) handshake(host string) error {
	d := tls.Dialer{
		NetDialer: &net.Dialer{Timeout: 10 * time.Second},
		// Only the server's side of the handshake matters here: the
		// cheapest key exchange, and no verification (the tests check
		// that the certificates verify).
		Config: &tls.Config{ServerName: host, InsecureSkipVerify: true, CurvePreferences: []tls.CurveID{tls.X25519}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", fx.HTTPSAddr)
	if err != nil {
		return fmt.Errorf("issuing the certificate of %s: %w", host, err)
	}
	return c.Close()
}

// Names of the files -fixture writes into -dir.
const (
	caFile         = "ca.pem"
	keysHitFile    = "keys-hit.txt"
	keysParentFile = "keys-parent.txt"
	keysIPFile     = "keys-ip.txt"
)

// writeFiles writes the CA certificate (for stsmap's SSL_CERT_FILE and
// -cold's -ca) and the key files into dir.
func (fx *benchFixture) writeFiles(dir string) error {
	if err := catch(func() { fx.CA.WriteCertFile(fx.t, dir) }); err != nil {
		return err
	}
	files := map[string][]string{
		keysHitFile:    fx.Domains,
		keysParentFile: parentKeys(fx.Domains),
		keysIPFile:     ipLiteralKeys(len(fx.Domains)),
	}
	for name, keys := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(strings.Join(keys, "\n")+"\n"), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// parentKeys returns the parent-domain keys Postfix asks after a NOTFOUND
// (SPEC 2.4): ".<domain>" for every domain, and after every tenth the
// zone's parents ".bench.test" and ".test".
func parentKeys(domains []string) []string {
	keys := make([]string, 0, len(domains)+len(domains)/5+2)
	for i, d := range domains {
		keys = append(keys, "."+d)
		if i%10 == 9 {
			keys = append(keys, "."+benchZone, "."+benchTLD)
		}
	}
	return keys
}

// ipLiteralKeys returns n IP-literal keys (SPEC 2.4) in the forms Postfix
// sends for next hops such as [192.0.2.1], in documentation ranges.
func ipLiteralKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		a, b := i%254+1, i/254%256
		switch i % 5 {
		case 0:
			keys[i] = fmt.Sprintf("[192.0.2.%d]", a)
		case 1:
			keys[i] = fmt.Sprintf("[ipv6:2001:db8::%x:%x]", b, a)
		case 2:
			keys[i] = fmt.Sprintf("198.51.100.%d", a)
		case 3:
			keys[i] = fmt.Sprintf("[203.0.113.%d]:25", a)
		default:
			keys[i] = fmt.Sprintf("2001:db8::%x:%x", b, a)
		}
	}
	return keys
}

// runFixture serves the fixture until ctx ends: it writes the files,
// prints the addresses to stderr and "ready" to stdout.
func runFixture(ctx context.Context, o fixtureOptions, stdout, stderr io.Writer) int {
	start := time.Now()
	fx, err := startFixture(o)
	if err != nil {
		fmt.Fprintf(stderr, "bench: -fixture: %v\n", err)
		return 1
	}
	defer fx.Close()
	if err := fx.writeFiles(o.dir); err != nil {
		fmt.Fprintf(stderr, "bench: -fixture: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "bench: fixture pid %d: %d domains %s to %s, DNS on %s, HTTPS on %s, CA %s (%.1fs)\n",
		os.Getpid(), len(fx.Domains), fx.Domains[0], fx.Domains[len(fx.Domains)-1], fx.DNS.Addr, fx.HTTPSAddr,
		filepath.Join(o.dir, caFile), time.Since(start).Seconds())
	fmt.Fprintln(stdout, "ready")
	<-ctx.Done()
	return 0
}
