package main

import (
	"bufio"
	"bytes"
	"fmt"
	"go.uber.org/goleak"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"stsmap/internal/fixture"
)

// The built binary, run the way the README says, inside a network namespace
// of its own: the namespace's /etc/resolv.conf points at a fixture DNS
// server on 127.0.0.1:53, and the policy hosts are served on the real port
// 443 of the namespace's loopback, with certificates from a private CA that
// the binary trusts through SSL_CERT_FILE (SPEC 4.2). Nothing in the
// binary knows it is being tested.

// fixtureDirEnv, when set, turns the test binary into the fixture process
// (see TestMain).
const fixtureDirEnv = "STSMAP_FIXTURE_DIR"

func TestMain(m *testing.M) {
	if dir := os.Getenv(fixtureDirEnv); dir != "" {
		os.Exit(serveFixture(dir))
	}
	if cfg := os.Getenv(daemonConfigEnv); cfg != "" {
		os.Exit(runTestDaemon(cfg))
	}
	// Fail the tests if any goroutine outlives them (issue 8).
	goleak.VerifyTestMain(m)
}

// procT lets the fixtures run outside a test.
type procT struct{ cleanups []func() }

func (p *procT) Helper()          {}
func (p *procT) Cleanup(f func()) { p.cleanups = append(p.cleanups, f) }
func (p *procT) Fatalf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "fixture: "+f+"\n", a...)
	os.Exit(1)
}

// serveFixture serves the test world on 127.0.0.1:53 and 127.0.0.1:443,
// writes the CA certificate into dir, prints "ready", and serves until its
// standard input closes.
func serveFixture(dir string) int {
	p := &procT{}
	w := fixture.NewWorldAt(p, "127.0.0.1:53", "127.0.0.1:443")
	publishTestDomains(p, w)
	w.CA.WriteCertFile(p, dir)
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	for i := len(p.cleanups) - 1; i >= 0; i-- {
		p.cleanups[i]()
	}
	return 0
}

func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "stsmap")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	return bin
}

// inNetns returns a command that runs inside the namespace.
func inNetns(ns string, env []string, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// waitLine reads r until a line contains want, and fails after timeout.
func waitLine(t *testing.T, r io.Reader, want string, timeout time.Duration) {
	t.Helper()
	found := make(chan bool, 1)
	go func() {
		s := bufio.NewScanner(r)
		for s.Scan() {
			if strings.Contains(s.Text(), want) {
				found <- true
				io.Copy(io.Discard, r)
				return
			}
		}
		found <- false
	}()
	select {
	case ok := <-found:
		if !ok {
			t.Fatalf("output ended before %q", want)
		}
	case <-time.After(timeout):
		t.Fatalf("no %q within %v", want, timeout)
	}
}

func TestBinaryInNetns(t *testing.T) {
	postmap := requireTool(t, "postmap", "postfix")
	ns := fixture.NewNetns(t, "stsmap-test")
	bin := buildBinary(t)
	dir := t.TempDir()

	fix := inNetns(ns, []string{fixtureDirEnv + "=" + dir}, os.Args[0], "-test.run=^$")
	stdin, _ := fix.StdinPipe()
	stdout, _ := fix.StdoutPipe()
	fix.Stderr = os.Stderr
	if err := fix.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		fix.Wait()
	})
	waitLine(t, stdout, "ready", time.Minute)
	env := []string{"SSL_CERT_FILE=" + filepath.Join(dir, "ca.pem")}
	const want = "secure match=mx1.example.com:.example.net servername=hostname\n"

	// stsmap query with the embedded defaults: /etc/resolv.conf's
	// nameserver, port 443, the system roots.
	for _, tc := range []struct {
		key        string
		wantStatus int
		wantOut    string
	}{
		{"example.com", 0, want},
		{"testing.example", 1, ""},
		{"nxdomain.example", 1, ""},
	} {
		var out, errb bytes.Buffer
		cmd := inNetns(ns, env, bin, "query", tc.key)
		cmd.Stdout, cmd.Stderr = &out, &errb
		cmd.Run()
		if status := cmd.ProcessState.ExitCode(); status != tc.wantStatus || out.String() != tc.wantOut {
			t.Errorf("stsmap query %s: got exit %d output %q (stderr %q), want %d %q", tc.key, status, out.String(), errb.String(), tc.wantStatus, tc.wantOut)
		}
	}

	// The daemon with the embedded defaults, asked by Postfix's postmap on
	// the documented address.
	// The embedded store goes to $STATE_DIRECTORY, as under systemd.
	stateDir := t.TempDir()
	daemon := inNetns(ns, append(env, "STATE_DIRECTORY="+stateDir), bin)
	logs, _ := daemon.StderrPipe()
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	var logBuf bytes.Buffer
	waitLine(t, io.TeeReader(logs, &logBuf), "stsmap serving", time.Minute)
	confDir := t.TempDir()
	os.WriteFile(filepath.Join(confDir, "main.cf"), nil, 0o644)
	for _, tc := range []struct {
		key        string
		wantStatus int
		wantOut    string
	}{
		{"example.com", 0, want},
		{"[example.com]:25", 0, want},
		{"nxdomain.example", 1, ""},
	} {
		out, _ := inNetns(ns, nil, postmap, "-c", confDir, "-q", tc.key, "socketmap:inet:127.0.0.1:8461:postfix").Output()
		// exit status read from the output: postmap prints nothing for NOTFOUND
		if string(out) != tc.wantOut {
			t.Errorf("postmap -q %s: got %q, want %q", tc.key, out, tc.wantOut)
		}
	}
	// SPEC 8.1: SIGTERM stops it cleanly.
	daemon.Process.Signal(syscall.SIGTERM)
	if err := daemon.Wait(); err != nil {
		t.Errorf("stsmap after SIGTERM: %v; log:\n%s", err, logBuf.String())
	}
	if st, err := os.Stat(filepath.Join(stateDir, "policies.db")); err != nil || st.Size() == 0 {
		t.Errorf("embedded store in $STATE_DIRECTORY: %v", err)
	}
}
