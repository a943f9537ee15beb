package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// startFloor runs the floor responder on 127.0.0.1:0 until the test ends.
func startFloor(t *testing.T, reply string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { serveFloor(ln, []byte(reply)); close(done) }()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func testConfig(addr string, pipeline int, expect bool) config {
	mix, _ := parseMix("hits=80,parent=10,miss=10")
	keys, classes := genKeys(mix, 100, 1000, 1)
	return config{
		addr: addr, conns: 4, total: 2000, pipeline: pipeline, mapName: "postfix",
		expect: expect, timeout: 10 * time.Second,
		pool: makePool("postfix", keys, classes), maxErrShow: maxErrorsShown,
	}
}

func TestClientAgainstFloor(t *testing.T) {
	addr := startFloor(t, "OK secure match=mx.example.com servername=hostname")
	for _, k := range []int{1, 8} {
		res := runClient(testConfig(addr, k, false))
		if res.Errors != 0 || res.Requests != 2000 {
			t.Errorf("pipeline %d: %d requests, %d errors %q; want 2000, 0", k, res.Requests, res.Errors, res.FirstErrs)
		}
		if res.P50 <= 0 || res.Max < res.P999 || res.P999 < res.P99 || res.P99 < res.P50 {
			t.Errorf("pipeline %d: bad latencies %+v", k, res.LatencyUs)
		}
	}
}

func TestClientCountsWrongReplies(t *testing.T) {
	// Every reply is OK, so with -expect-prefix the parent and miss keys
	// (about 20%) are errors.
	addr := startFloor(t, "OK x")
	res := runClient(testConfig(addr, 8, true))
	if res.Requests != 2000 || res.Errors < 200 || res.Errors > 600 {
		t.Errorf("%d requests, %d errors; want 2000 and about 400", res.Requests, res.Errors)
	}
	if len(res.FirstErrs) != maxErrorsShown || !strings.Contains(res.FirstErrs[0], "want NOTFOUND") {
		t.Errorf("first errors %q", res.FirstErrs)
	}

	// A reply without a valid reply word is an error even without expect.
	addr = startFloor(t, "BOGUS")
	res = runClient(testConfig(addr, 1, false))
	if res.Errors != res.Requests || res.Requests != 2000 {
		t.Errorf("bad word: %d requests, %d errors", res.Requests, res.Errors)
	}
}

func TestRunFlags(t *testing.T) {
	addr := startFloor(t, "NOTFOUND ")
	var out, errOut bytes.Buffer
	code := run([]string{"-addr", addr, "-c", "2", "-n", "300", "-pipeline", "4",
		"-gen", "hits=0,parent=50,miss=50", "-expect-prefix", "-pid", strconv.Itoa(os.Getpid()), "-json"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d; stderr %s; stdout %s", code, errOut.String(), out.String())
	}
	for _, want := range []string{`"requests": 300`, `"errors": 0`, `"server_cpu_us_per_request"`, `"p99_9"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %s:\n%s", want, out.String())
		}
	}
}

func TestKeysFile(t *testing.T) {
	addr := startFloor(t, "OK x")
	path := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(path, []byte("a.example\n\nb.example\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"-addr", addr, "-c", "3", "-n", "100", "-keys", path, "-expect-prefix"}, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s%s", code, errOut.String(), out.String())
	}
	if !strings.Contains(out.String(), "requests     100\n") {
		t.Errorf("output:\n%s", out.String())
	}
}

func TestGenKeysMix(t *testing.T) {
	mix, err := parseMix("hits=80,parent=10,miss=10")
	if err != nil || mix != [3]int{80, 10, 10} {
		t.Fatalf("parseMix = %v, %v", mix, err)
	}
	const n, domains = 100000, 50
	keys, classes := genKeys(mix, domains, n, 7)
	var count [4]int
	for i, k := range keys {
		count[classes[i]]++
		switch classes[i] {
		case classHit:
			var d int
			if _, err := fmt.Sscanf(k, "d%d.example", &d); err != nil || d < 0 || d >= domains || k != "d"+strconv.Itoa(d)+".example" {
				t.Fatalf("hit key %q", k)
			}
		case classParent:
			if !strings.HasPrefix(k, ".d") || !strings.HasSuffix(k, ".example") {
				t.Fatalf("parent key %q", k)
			}
		case classMiss:
			if !strings.HasPrefix(k, "m") || !strings.HasSuffix(k, ".invalid") {
				t.Fatalf("miss key %q", k)
			}
		default:
			t.Fatalf("class %d", classes[i])
		}
	}
	for c, want := range map[int]float64{classHit: 0.8, classParent: 0.1, classMiss: 0.1} {
		if got := float64(count[c]) / n; got < want-0.01 || got > want+0.01 {
			t.Errorf("class %d: share %.3f, want %.2f±0.01", c, got, want)
		}
	}

	_, classes = genKeys([3]int{0, 1, 0}, 10, 100, 1)
	for _, c := range classes {
		if c != classParent {
			t.Fatalf("parent-only mix gave class %d", c)
		}
	}
	for _, bad := range []string{"hits=x", "foo=1", "hits=0,miss=0", "hits=-1", "hits"} {
		if _, err := parseMix(bad); err == nil {
			t.Errorf("parseMix(%q) accepted", bad)
		}
	}
}

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		d := make([]time.Duration, len(v))
		for i, x := range v {
			d[i] = time.Duration(x) * time.Millisecond
		}
		return d
	}
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	for _, tc := range []struct {
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{nil, 50, 0},
		{ms(5), 50, 5 * time.Millisecond},
		{ms(5), 99.9, 5 * time.Millisecond},
		{ms(1, 2), 50, 1 * time.Millisecond},
		{ms(1, 2), 51, 2 * time.Millisecond},
		{ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{ms(1, 2, 3, 4), 75, 3 * time.Millisecond},
		{ms(1, 2, 3, 4), 100, 4 * time.Millisecond},
		{hundred, 50, 50 * time.Millisecond},
		{hundred, 90, 90 * time.Millisecond},
		{hundred, 99, 99 * time.Millisecond},
		{hundred, 99.9, 100 * time.Millisecond},
		{hundred, 0.1, 1 * time.Millisecond},
	} {
		if got := percentile(tc.in, tc.p); got != tc.want {
			t.Errorf("percentile(%d samples, %v) = %v, want %v", len(tc.in), tc.p, got, tc.want)
		}
	}
}

func TestProcStat(t *testing.T) {
	// Burn some CPU so that the value can grow past a tick.
	before, err := procCPU(os.Getpid())
	if err != nil {
		t.Fatalf("/proc/self/stat: %v", err)
	}
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parseStat(string(data)); err != nil {
		t.Fatalf("parseStat(/proc/self/stat): %v", err)
	}
	x := 0
	for end := time.Now().Add(50 * time.Millisecond); time.Now().Before(end); {
		x++
	}
	after, err := procCPU(os.Getpid())
	if err != nil || after < before || before < 0 {
		t.Errorf("CPU before %v after %v err %v", before, after, err)
	}

	// A command name with spaces and parentheses; utime 250, stime 50.
	line := "1234 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0\n"
	if got, err := parseStat(line); err != nil || got != 3.0 {
		t.Errorf("parseStat = %v, %v; want 3, nil", got, err)
	}
	if _, err := parseStat("1234 (x) S 1 2"); err == nil {
		t.Error("short stat accepted")
	}
	_ = x
}
