package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"stsmap/config"
	"stsmap/internal/fixture"
)

// newTestWorld starts fixtures publishing the domains the end-to-end tests
// look up.
func newTestWorld(t *testing.T) *fixture.World {
	t.Helper()
	w := fixture.NewWorld(t)
	publishTestDomains(t, w)
	return w
}

func publishTestDomains(t fixture.T, w *fixture.World) {
	w.Publish(t, "example.com", "20260101", "enforce", 86400, "mx1.example.com", "*.example.net")
	w.Publish(t, "testing.example", "1", "testing", 86400, "mx.testing.example")
	w.Publish(t, "none.example", "1", "none", 86400)
	w.Publish(t, "xn--bcher-kva.example", "7", "enforce", 3600, "mx.xn--bcher-kva.example")
	// A record but no policy: the fetch gets a 404.
	w.DNS.Add(t, `_mta-sts.broken.example. 300 IN TXT "v=STSv1; id=1"`, `mta-sts.broken.example. 300 IN A 127.0.0.1`)
	w.DNS.Add(t, `other.example. 300 IN A 192.0.2.1`)
}

func testConfig(w *fixture.World, listen ...string) *config.Config {
	cfg := config.Default()
	cfg.Listen = listen
	cfg.DNS.Nameservers = []string{w.DNS.Addr}
	cfg.Cache.Store = "memory"
	cfg.Metrics.Listen = "" // tests run many daemons at once
	cfg.Admin.Socket = "none"
	cfg.Fetch.FirstContactTimeout = 10 * time.Second // loopback fixtures; the race detector is slow
	return cfg
}

func testEnv(w *fixture.World) *env {
	return &env{stdout: io.Discard, stderr: io.Discard, rootCAs: w.CA.Pool, dial: w.Policy.Dial}
}

// startServe runs the daemon in-process and returns its listeners'
// addresses; it is stopped when the test ends.
func startServe(t *testing.T, cfg *config.Config, e *env) []net.Addr {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan []net.Addr, 1)
	e.ready = func(a []net.Addr) { ready <- a }
	done := make(chan int, 1)
	go func() { done <- serve(ctx, cfg, "", e) }()
	t.Cleanup(func() {
		cancel()
		if status := <-done; status != exitOK {
			t.Errorf("serve exited with status %d, want %d", status, exitOK)
		}
	})
	select {
	case a := <-ready:
		return a
	case status := <-done:
		t.Fatalf("serve exited early with status %d", status)
	}
	return nil
}

func netstring(s string) string { return strconv.Itoa(len(s)) + ":" + s + "," }

// exchange sends one request over a raw connection and reads one reply
// netstring byte by byte.
func exchange(t *testing.T, c net.Conn, r *bufio.Reader, req string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, netstring(req)); err != nil {
		t.Fatalf("write %q: %v", req, err)
	}
	n := 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			t.Fatalf("read reply length for %q: %v", req, err)
		}
		if b == ':' {
			break
		}
		if b < '0' || b > '9' {
			t.Fatalf("reply for %q: bad length byte %q", req, b)
		}
		n = n*10 + int(b-'0')
	}
	buf := make([]byte, n+1)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatalf("read reply for %q: %v", req, err)
	}
	if buf[n] != ',' {
		t.Fatalf("reply for %q: missing comma", req)
	}
	return string(buf[:n])
}

// endToEndCases are lookups and the exact replies Postfix must get
// (SPEC 2, 7).
var endToEndCases = []struct{ req, want string }{
	{"postfix example.com", "OK secure match=mx1.example.com:.example.net servername=hostname"},
	{"postfix EXAMPLE.COM.", "OK secure match=mx1.example.com:.example.net servername=hostname"},
	{"postfix [example.com]:587", "OK secure match=mx1.example.com:.example.net servername=hostname"},
	{"postfix example.com:25", "OK secure match=mx1.example.com:.example.net servername=hostname"},
	{"postfix bücher.example", "OK secure match=mx.xn--bcher-kva.example servername=hostname"},
	{"postfix .example.com", "NOTFOUND "},
	{"postfix [192.0.2.1]", "NOTFOUND "},
	{"postfix testing.example", "NOTFOUND "},
	{"postfix none.example", "NOTFOUND "},
	{"postfix other.example", "NOTFOUND "},
	{"postfix nxdomain.example", "NOTFOUND "},
	{"postfix broken.example", "NOTFOUND "},
	{"postfix ", "NOTFOUND "},
	{"strict testing.example", "OK secure match=mx.testing.example"},
}

func TestServeEndToEnd(t *testing.T) {
	w := newTestWorld(t)
	sock := filepath.Join(t.TempDir(), "stsmap.sock")
	cfg := testConfig(w, "127.0.0.1:0", "unix:"+sock)
	cfg.Maps["strict"] = config.MapConfig{StrictTesting: ptr(true), Servername: ptr(false)}
	addrs := startServe(t, cfg, testEnv(w))

	for _, a := range addrs {
		t.Run(a.Network(), func(t *testing.T) {
			c, err := net.Dial(a.Network(), a.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			// Twice over one connection: the second round is served from
			// the cache.
			for round := range 2 {
				for _, tc := range endToEndCases {
					if got := exchange(t, c, r, tc.req); got != tc.want {
						t.Errorf("round %d: %q: got %q, want %q", round, tc.req, got, tc.want)
					}
				}
			}
		})
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != cfg.Socketmap.UnixSocketMode {
		t.Errorf("unix socket mode: got %v (%v), want %v", st.Mode().Perm(), err, cfg.Socketmap.UnixSocketMode)
	}
}

func ptr[T any](v T) *T { return &v }

// The cache answers a second lookup without a second fetch, and parent
// lookups never touch DNS (SPEC 2.4, 6.1).
func TestServeCachesAndSkipsParentLookups(t *testing.T) {
	w := newTestWorld(t)
	addrs := startServe(t, testConfig(w, "127.0.0.1:0"), testEnv(w))
	c, err := net.Dial("tcp", addrs[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	exchange(t, c, r, "postfix example.com")
	queries, fetches := w.DNS.Queries(), w.Policy.Fetches()
	for _, req := range []string{"postfix example.com", "postfix .example.com", "postfix .com", "postfix [192.0.2.7]:25"} {
		exchange(t, c, r, req)
	}
	if q, f := w.DNS.Queries(), w.Policy.Fetches(); q != queries || f != fetches {
		t.Errorf("cached and skipped lookups did I/O: DNS queries %d->%d, fetches %d->%d", queries, q, fetches, f)
	}
}

func writeConfig(t *testing.T, w *fixture.World) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "stsmap.yaml")
	body := fmt.Sprintf("dns:\n  nameservers: [%q]\n", w.DNS.Addr)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func runCmd(t *testing.T, e *env, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	e.stdout, e.stderr = &out, &errb
	status = run(context.Background(), args, e)
	return status, out.String(), errb.String()
}

func TestQuery(t *testing.T) {
	w := newTestWorld(t)
	cfgPath := writeConfig(t, w)
	tests := []struct {
		key        string
		wantStatus int
		wantOut    string
	}{
		{"example.com", exitOK, "secure match=mx1.example.com:.example.net servername=hostname\n"},
		{"[Example.com]:25", exitOK, "secure match=mx1.example.com:.example.net servername=hostname\n"},
		{"testing.example", exitNotFound, ""},
		{"nxdomain.example", exitNotFound, ""},
		{".example.com", exitNotFound, ""},
	}
	for _, tt := range tests {
		status, out, stderr := runCmd(t, testEnv(w), "query", "-config", cfgPath, tt.key)
		if status != tt.wantStatus || out != tt.wantOut {
			t.Errorf("query %s: got status %d output %q (stderr %q), want %d %q", tt.key, status, out, stderr, tt.wantStatus, tt.wantOut)
		}
	}
}

func TestQueryJSON(t *testing.T) {
	w := newTestWorld(t)
	cfgPath := writeConfig(t, w)
	tests := []struct {
		key        string
		wantStatus int
		want       map[string]any
	}{
		{"Example.COM", exitOK, map[string]any{"domain": "example.com", "found": true, "reason": "policy", "policy_id": "20260101",
			"mode": "enforce", "max_age": 86400.0, "mx": []any{"mx1.example.com", "*.example.net"}}},
		{"testing.example", exitNotFound, map[string]any{"found": false, "reason": "mode_testing", "mode": "testing", "policy_id": "1"}},
		{"none.example", exitNotFound, map[string]any{"found": false, "reason": "mode_none"}},
		{"nxdomain.example", exitNotFound, map[string]any{"found": false, "reason": "no_record"}},
		{"broken.example", exitNotFound, map[string]any{"found": false, "reason": "fetch_failed", "policy_id": "1"}},
		{".example.com", exitNotFound, map[string]any{"found": false, "reason": "parent_domain"}},
		{"[192.0.2.1]", exitNotFound, map[string]any{"found": false, "reason": "ip_literal"}},
	}
	for _, tt := range tests {
		status, out, stderr := runCmd(t, testEnv(w), "query", "-config", cfgPath, "-json", tt.key)
		if status != tt.wantStatus {
			t.Errorf("query -json %s: got status %d, want %d (stderr %q)", tt.key, status, tt.wantStatus, stderr)
		}
		var got map[string]any
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("query -json %s: %v in %q", tt.key, err, out)
		}
		for k, want := range tt.want {
			if fmt.Sprint(got[k]) != fmt.Sprint(want) {
				t.Errorf("query -json %s: %s: got %v, want %v", tt.key, k, got[k], want)
			}
		}
		if got["reason"] == "fetch_failed" && !strings.Contains(fmt.Sprint(got["error"]), "404") {
			t.Errorf("query -json %s: error %q does not say why the fetch failed", tt.key, got["error"])
		}
		if got["found"] == true && (got["expires"] == nil || got["fetched"] == nil) {
			t.Errorf("query -json %s: no fetched/expires in %s", tt.key, out)
		}
	}
}

func TestCommandUsage(t *testing.T) {
	tests := []struct {
		args       []string
		wantStatus int
		wantOut    string // substring of stdout+stderr
	}{
		{[]string{"version"}, exitOK, "stsmap "},
		{[]string{"help"}, exitOK, "usage:"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"query"}, exitUsage, "usage:"},
		{[]string{"query", "-config", "/nonexistent/stsmap.yaml", "example.com"}, exitUsage, "/nonexistent/stsmap.yaml"},
		{[]string{"check-config"}, exitUsage, "usage:"},
		{[]string{"check-config", "-config", "config.example.yaml"}, exitOK, "config.example.yaml: OK"},
		{[]string{"check-config", "-config", "config/testdata/unknown_key.yaml"}, exitNotFound, "line "},
		{[]string{"serve", "extra"}, exitUsage, ""},
	}
	for _, tt := range tests {
		status, out, errOut := runCmd(t, &env{}, tt.args...)
		if status != tt.wantStatus || !strings.Contains(out+errOut, tt.wantOut) {
			t.Errorf("stsmap %s: got status %d output %q, want %d and %q", strings.Join(tt.args, " "), status, out+errOut, tt.wantStatus, tt.wantOut)
		}
	}
}

func requireTool(t *testing.T, name, pkg string) string { return fixture.RequireTool(t, name, pkg) }

// Postfix's own client (SPEC 1.6): found = value printed, exit 0; NOTFOUND
// = nothing printed, exit 1.
func TestPostmap(t *testing.T) {
	postmap := requireTool(t, "postmap", "postfix")
	w := newTestWorld(t)
	addrs := startServe(t, testConfig(w, "127.0.0.1:0"), testEnv(w))
	confDir := t.TempDir() // postmap -c needs a main.cf; an empty one will do
	if err := os.WriteFile(filepath.Join(confDir, "main.cf"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	table := "socketmap:inet:" + addrs[0].String() + ":postfix"
	tests := []struct {
		key        string
		wantStatus int
		wantOut    string
	}{
		{"example.com", 0, "secure match=mx1.example.com:.example.net servername=hostname\n"},
		{"nxdomain.example", 1, ""},
		{"[example.com]:587", 0, "secure match=mx1.example.com:.example.net servername=hostname\n"},
		{".example.com", 1, ""},
	}
	for _, tt := range tests {
		cmd := exec.Command(postmap, "-c", confDir, "-q", tt.key, table)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		status := cmd.ProcessState.ExitCode()
		if err != nil && status < 0 {
			t.Fatalf("postmap: %v", err)
		}
		if status != tt.wantStatus || out.String() != tt.wantOut {
			t.Errorf("postmap -q %s: got exit %d output %q (stderr %q), want %d %q", tt.key, status, out.String(), errb.String(), tt.wantStatus, tt.wantOut)
		}
	}
}

// The README, postfix-snippets/ and config.example.yaml must agree: the
// main.cf lines point at a listener the defaults open, and the map names
// they use resolve (SPEC 1.5).
func TestDocsAgreeWithConfig(t *testing.T) {
	example, err := config.Load("config.example.yaml")
	if err != nil {
		t.Fatalf("config.example.yaml: %v", err)
	}
	tcp := regexp.MustCompile(`socketmap:inet:([0-9.]+:[0-9]+):([A-Za-z0-9_-]+)`)
	unix := regexp.MustCompile(`socketmap:unix:([^:\s]+):([A-Za-z0-9_-]+)`)
	files, _ := filepath.Glob("postfix-snippets/*")
	files = append(files, "README.md")
	sawTCP := false
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range tcp.FindAllStringSubmatch(string(b), -1) {
			if m[1] == "127.0.0.1:8461" {
				sawTCP = true
			}
			if !contains(example.Listen, m[1]) && m[1] != "127.0.0.1:8461" {
				t.Errorf("%s: %s is not a listener of config.example.yaml (%v)", f, m[0], example.Listen)
			}
		}
		for _, m := range unix.FindAllStringSubmatch(string(b), -1) {
			if !strings.HasPrefix(m[1], "/var/spool/postfix/") && !strings.HasPrefix(m[1], "stsmap/") {
				t.Errorf("%s: %s: a unix socket Postfix's chrooted smtp(8) cannot reach", f, m[0])
			}
		}
	}
	if !sawTCP || !contains(example.Listen, "127.0.0.1:8461") {
		t.Errorf("the documented socketmap:inet:127.0.0.1:8461 must be config.example.yaml's listener (%v) and appear in the docs", example.Listen)
	}
	if !contains(config.Default().Listen, "127.0.0.1:8461") {
		t.Errorf("embedded default listen %v lacks 127.0.0.1:8461", config.Default().Listen)
	}
	// The unix snippet's stsmap side agrees with its main.cf side.
	b, _ := os.ReadFile("postfix-snippets/main.cf-unix")
	if !strings.Contains(string(b), `listen: ["unix:/var/spool/postfix/stsmap/stsmap.sock"]`) ||
		!strings.Contains(string(b), "socketmap:unix:stsmap/stsmap.sock:postfix") {
		t.Errorf("postfix-snippets/main.cf-unix: the listen path and the main.cf path disagree")
	}
	readme, _ := os.ReadFile("README.md")
	for _, cmd := range []string{"go build -o stsmap . && ./stsmap", "go test -race -count=1 ./..."} {
		if !strings.Contains(string(readme), cmd) {
			t.Errorf("README.md lacks the command %q", cmd)
		}
	}
	ci, _ := os.ReadFile(".ci/run")
	if !strings.Contains(string(ci), "go test -race -count=1 ./...") {
		t.Errorf(".ci/run does not run the README's test command")
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// SPEC 8.2: nothing is logged per cache hit at the default level.
func TestNoLogPerCacheHit(t *testing.T) {
	w := newTestWorld(t)
	var logs fixture.SyncBuffer
	e := testEnv(w)
	e.stderr = &logs
	addrs := startServe(t, testConfig(w, "127.0.0.1:0"), e)
	c, err := net.Dial("tcp", addrs[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	exchange(t, c, r, "postfix example.com") // learned: one line
	before := logs.String()
	if !strings.Contains(before, "policy learned") {
		t.Fatalf("no log line for the learned policy:\n%s", before)
	}
	for range 100 {
		exchange(t, c, r, "postfix example.com")
		exchange(t, c, r, "postfix .example.com")
	}
	if after := logs.String(); after != before {
		t.Errorf("cache hits were logged:\n%s", strings.TrimPrefix(after, before))
	}
}
