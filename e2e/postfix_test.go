// Package e2e proves, with Debian's real Postfix, that mail is delivered or
// held exactly as each MTA-STS policy says, when Postfix is wired to stsmap
// as the README says.
//
// The suite runs as root in a network namespace of its own. The outer test
// creates the namespace and re-runs this test binary inside it; inside,
// everything is on the namespace's loopback: the fixture DNS server on
// 127.0.0.1:53 (Postfix's resolver reads /etc/netns/<name>/resolv.conf),
// HTTPS policy hosts on 127.0.0.1:443 with certificates from a private CA,
// SMTP receivers on port 25 of 127.0.0.2 (a certificate valid for whatever
// MX name is asked) and 127.0.0.3 (a self-signed one), stsmap built from the
// tree on 127.0.0.1:8461, and a private Postfix instance whose
// smtp_tls_policy_maps points at it.
//
//	go test -count=1 -v ./e2e/
package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"stsmap/internal/fixture"
)

// insideEnv marks the re-run of the test binary inside the namespace.
const insideEnv = "STSMAP_E2E_INSIDE"

func TestPostfixE2E(t *testing.T) {
	if os.Getenv(insideEnv) != "" {
		runScenarios(t)
		return
	}
	fixture.RequireRoot(t, "a network namespace, ports 25, 53 and 443, a private Postfix")
	for _, tool := range []string{"postfix", "sendmail", "postqueue"} {
		fixture.RequireTool(t, tool, "postfix")
	}
	ns := fixture.NewNetns(t, "stsmap-e2e")

	bin := filepath.Join(t.TempDir(), "stsmap")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}

	inner := exec.Command("ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestPostfixE2E$", "-test.v", "-test.timeout=15m")
	inner.Env = append(os.Environ(), insideEnv+"=1", "STSMAP_E2E_BIN="+bin)
	inner.Stdout, inner.Stderr = os.Stdout, os.Stderr
	if err := inner.Run(); err != nil {
		t.Fatalf("the scenarios failed inside namespace %s: %v (their output is above)", ns, err)
	}
}

const (
	goodMX = "127.0.0.2" // certificate valid for the MX name asked
	badMX  = "127.0.0.3" // self-signed certificate
	nobody = "127.0.0.9" // nothing listens here
)

// world is everything the scenarios run against.
type world struct {
	*fixture.World
	good, bad *fixture.SMTPServer
	postfix   *fixture.Postfix
	stsmap    string // socketmap address
	caFile    string
}

// publish makes domain's MX point at mxAddr and, unless mode is "", publishes
// an MTA-STS policy with id and the given mx patterns.
func (w *world) publish(t *testing.T, domain, mxAddr, mode, id string, mx ...string) {
	t.Helper()
	w.DNS.Add(t, fmt.Sprintf("%s. 300 IN MX 10 mx.%s.", domain, domain), fmt.Sprintf("mx.%s. 300 IN A %s", domain, mxAddr))
	if mode != "" {
		w.Publish(t, domain, id, mode, 86400, mx...)
	}
}

func setup(t *testing.T) *world {
	t.Helper()
	dir := t.TempDir()
	w := &world{World: fixture.NewWorldAt(t, "127.0.0.1:53", "127.0.0.1:443")}
	w.caFile = w.CA.WriteCertFile(t, dir)
	w.good = fixture.NewSMTPServer(t, goodMX+":25", "good.receiver.test", fixture.CertsFromCA(w.CA, "mx.good.test"))
	w.bad = fixture.NewSMTPServer(t, badMX+":25", "bad.receiver.test", fixture.CertFor(fixture.SelfSigned(t, "mx.bad.test")))

	// stsmap, built from the tree, as an administrator would run it.
	w.stsmap = "127.0.0.1:8461"
	cfg := filepath.Join(dir, "stsmap.yaml")
	body := fmt.Sprintf("listen: [%q]\ndns:\n  nameservers: [\"127.0.0.1:53\"]\ncache:\n  store: bolt\n  path: %q\nrefresh:\n  interval: 1m\nlog:\n  level: debug\n",
		w.stsmap, filepath.Join(dir, "policies.db"))
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	startStsmap(t, os.Getenv("STSMAP_E2E_BIN"), cfg, w.caFile, filepath.Join(dir, "stsmap.log"))

	w.postfix = fixture.StartPostfix(t, fixture.PostfixOptions{
		Dir: filepath.Join(dir, "postfix"),
		Main: map[string]string{
			"smtp_tls_policy_maps":    "socketmap:inet:" + w.stsmap + ":postfix",
			"smtp_tls_CAfile":         w.caFile,
			"smtp_tls_security_level": "may",
		},
	})
	return w
}

// startStsmap runs the binary until the test ends and waits until it
// serves.
func startStsmap(t *testing.T, bin, cfg, caFile, logFile string) {
	t.Helper()
	log, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "-config", cfg)
	cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+caFile)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logFile)
			t.Logf("stsmap log:\n%s", b)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("tcp", "127.0.0.1:8461")
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logFile)
			t.Fatalf("stsmap not listening after 30s:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ask returns stsmap's reply for a key, as Postfix would get it.
func (w *world) ask(t *testing.T, key string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", w.stsmap, 5*time.Second)
	if err != nil {
		t.Fatalf("stsmap: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	req := "postfix " + key
	fmt.Fprintf(c, "%d:%s,", len(req), req)
	r := bufio.NewReader(c)
	n := 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			t.Fatalf("stsmap reply: %v", err)
		}
		if b == ':' {
			break
		}
		n = n*10 + int(b-'0')
	}
	buf := make([]byte, n+1)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatalf("stsmap reply: %v", err)
	}
	return string(buf[:n])
}

// delivery is one message sent in a scenario.
type delivery struct {
	rcpt   string
	offset int // Postfix log size when it was sent
}

func (w *world) send(t *testing.T, rcpt string) delivery {
	t.Helper()
	d := delivery{rcpt: rcpt, offset: w.postfix.LogSize()}
	w.postfix.Send(t, "sender@sender.test", rcpt, "stsmap e2e "+t.Name(), "scenario "+t.Name())
	return d
}

// waitStatus waits until Postfix logs status=want (sent, deferred) for the
// delivery and returns that log line. A first attempt with another status
// fails the test, unless retries are expected. On failure it prints the
// scenario's Postfix log lines.
func (w *world) waitStatus(t *testing.T, d delivery, want string, retries bool) string {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		for _, line := range strings.Split(w.postfix.LogSince(d.offset), "\n") {
			if strings.Contains(line, "to=<"+d.rcpt+">") && strings.Contains(line, "status=") {
				if strings.Contains(line, "status="+want) {
					return line
				}
				if retries {
					continue
				}
				t.Errorf("%s: got %s, want status=%s\nPostfix log since the message was sent:\n%s", d.rcpt, line, want, w.postfix.LogSince(d.offset))
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no status=%s within 90s\nPostfix log since the message was sent:\n%s", d.rcpt, want, w.postfix.LogSince(d.offset))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// received returns the message a receiver got for rcpt.
func received(r *fixture.SMTPServer, rcpt string) (fixture.Message, bool) {
	for _, m := range r.Messages() {
		for _, to := range m.To {
			if strings.EqualFold(to, rcpt) {
				return m, true
			}
		}
	}
	return fixture.Message{}, false
}

// deferredIn reports whether rcpt waits in Postfix's deferred queue.
func (w *world) deferredIn(t *testing.T, rcpt string) bool {
	t.Helper()
	for _, q := range w.postfix.Queue(t) {
		for _, r := range q.Recipients {
			if r.Address == rcpt && q.QueueName == "deferred" {
				return true
			}
		}
	}
	return false
}

func (w *world) expectDelivered(t *testing.T, d delivery, r *fixture.SMTPServer, verified bool) {
	t.Helper()
	w.expectDeliveredAfter(t, d, r, verified, false)
}

// expectDeliveredAfter is expectDelivered, optionally after deferrals.
func (w *world) expectDeliveredAfter(t *testing.T, d delivery, r *fixture.SMTPServer, verified, retries bool) {
	t.Helper()
	line := w.waitStatus(t, d, "sent", retries)
	m, ok := received(r, d.rcpt)
	if !ok {
		t.Fatalf("%s: Postfix says sent (%s) but the receiver has no such message", d.rcpt, line)
	}
	if !m.TLS {
		t.Errorf("%s: delivered without TLS", d.rcpt)
	}
	log := w.postfix.LogSince(d.offset)
	if verified && !strings.Contains(log, "Verified TLS connection established") {
		t.Errorf("%s: delivered, but not over verified TLS:\n%s", d.rcpt, log)
	}
}

func (w *world) expectHeld(t *testing.T, d delivery, logWants string) {
	t.Helper()
	line := w.waitStatus(t, d, "deferred", false)
	if _, ok := received(w.good, d.rcpt); ok {
		t.Errorf("%s: delivered to the good receiver, want it held", d.rcpt)
	}
	if _, ok := received(w.bad, d.rcpt); ok {
		t.Errorf("%s: delivered to the bad receiver, want it held", d.rcpt)
	}
	if !w.deferredIn(t, d.rcpt) {
		t.Errorf("%s: not in the deferred queue: %+v", d.rcpt, w.postfix.Queue(t))
	}
	if logWants != "" && !strings.Contains(line, logWants) {
		t.Errorf("%s: the deferral does not name %q: %s", d.rcpt, logWants, line)
	}
}

func runScenarios(t *testing.T) {
	w := setup(t)
	w.publish(t, "s1.test", goodMX, "enforce", "1", "mx.s1.test")
	w.publish(t, "s2.test", badMX, "enforce", "1", "mx.s2.test")
	w.publish(t, "s3.test", goodMX, "enforce", "1", "mx.elsewhere.test")
	w.publish(t, "s4.test", badMX, "testing", "1", "mx.s4.test")
	w.publish(t, "s5.test", badMX, "", "")
	w.publish(t, "s6.test", badMX, "enforce", "1", "mx.s6.test")
	w.DNS.Remove("mta-sts.s6.test", dns.TypeA)
	w.DNS.Add(t, "mta-sts.s6.test. 300 IN A "+nobody)
	w.publish(t, "s7.test", goodMX, "enforce", "1", "mx.s7.test")
	w.DNS.Add(t, "s8.test. 300 IN MX 10 mx1.s8.test.", "mx1.s8.test. 300 IN A "+goodMX, "mx2.s8.test. 300 IN A "+goodMX)
	w.Publish(t, "s8.test", "1", "enforce", 86400, "mx1.s8.test")

	t.Run("1 enforce, valid certificate: delivered over verified TLS", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "user@s1.test"), w.good, true)
	})
	t.Run("2 enforce, bad certificate: held, the log names the certificate", func(t *testing.T) {
		w.expectHeld(t, w.send(t, "user@s2.test"), "certificate")
	})
	t.Run("3 enforce, MX not covered by the policy: held", func(t *testing.T) {
		w.expectHeld(t, w.send(t, "user@s3.test"), "")
	})
	t.Run("4 testing, bad certificate: delivered", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "user@s4.test"), w.bad, false)
	})
	t.Run("5 no policy: delivered", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "user@s5.test"), w.bad, false)
	})
	t.Run("6 enforce, policy host unreachable at first contact: delivered", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "user@s6.test"), w.bad, false)
	})
	t.Run("7 cached policy still enforced when DNS fails and the policy host is gone", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "first@s7.test"), w.good, true)
		w.DNS.SetRcode("_mta-sts.s7.test", dns.TypeTXT, dns.RcodeServerFailure)
		w.Policy.SetPolicy("s7.test", "")
		w.DNS.Remove("mx.s7.test", dns.TypeA)
		w.DNS.Add(t, "mx.s7.test. 300 IN A "+badMX)
		w.expectHeld(t, w.send(t, "second@s7.test"), "certificate")
	})
	t.Run("8 a new id moves the MX: after a refresh mail follows the new policy", func(t *testing.T) {
		w.expectDelivered(t, w.send(t, "first@s8.test"), w.good, true)
		// The domain moves to mx2 and publishes a policy naming it.
		w.DNS.Remove("s8.test", dns.TypeMX)
		w.DNS.Add(t, "s8.test. 300 IN MX 10 mx2.s8.test.")
		w.DNS.Remove("_mta-sts.s8.test", dns.TypeTXT)
		w.Publish(t, "s8.test", "2", "enforce", 86400, "mx2.s8.test")
		// Until stsmap's refresh, the cached policy holds mail for mx2.
		d := w.send(t, "second@s8.test")
		w.expectHeld(t, d, "")
		deadline := time.Now().Add(3 * time.Minute)
		for !strings.Contains(w.ask(t, "s8.test"), "mx2.s8.test") {
			if time.Now().After(deadline) {
				t.Fatalf("stsmap did not pick up the new policy within 3 minutes: %q", w.ask(t, "s8.test"))
			}
			time.Sleep(time.Second)
		}
		w.postfix.Flush(t)
		w.expectDeliveredAfter(t, d, w.good, true, true)
	})
}
