package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"stsmap/config"
	"stsmap/internal/fixture"
)

// Hostile clients against stsmap as a real process (issue 8, item 4): what
// ten thousand connections at once and a pipelined flood cost the daemon in
// memory, threads and file descriptors, and that it gives them all back.
// socketmap/hostile_test.go tests the same against the server in-process.

// procFigures are a process's resource figures read from /proc.
type procFigures struct {
	rssKiB, hwmKiB int // VmRSS, VmHWM (the peak RSS so far)
	threads, fds   int
}

func (f procFigures) String() string {
	return fmt.Sprintf("RSS %.1f MiB (peak %.1f MiB), %d threads, %d fds",
		float64(f.rssKiB)/1024, float64(f.hwmKiB)/1024, f.threads, f.fds)
}

func readProcFigures(pid int) (procFigures, error) {
	var f procFigures
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return f, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		key, value, _ := strings.Cut(line, ":")
		n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(value), " kB"))
		switch key {
		case "VmRSS":
			f.rssKiB = n
		case "VmHWM":
			f.hwmKiB = n
		case "Threads":
			f.threads = n
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	f.fds = len(fds)
	return f, err
}

func TestHostileClientsRSS(t *testing.T) {
	const (
		floodConns = 10000
		pipeConns  = 8
		// Bounds on the daemon, far above what it needs (see the log),
		// far below what unbounded buffering or a goroutine pile-up take.
		maxThreads = 100
	)
	maxRSSKiB := 256 << 10
	// The race detector's shadow memory grows with every allocation and
	// goroutine ("memory usage may increase by 5-10x", its documentation
	// says): the daemon built with it gets a smaller pipelined flood and
	// twice the RSS bound.
	pipeReqs := 12500 // per connection
	if fixture.RaceEnabled() {
		pipeReqs /= 5
		maxRSSKiB *= 2
	}
	// The flood's client ends are in this process; the daemon is another.
	fixture.RaiseFileLimit(t, floodConns+500)
	maxConns := config.Default().Socketmap.MaxConnections
	w := newTestWorld(t)
	d := startDaemon(t, w, t.TempDir(), "cache:\n  store: memory\n")
	pid := d.cmd.Process.Pid
	figures := func(stage string) procFigures {
		t.Helper()
		f, err := readProcFigures(pid)
		if err != nil {
			t.Fatalf("%s: %v\n%s", stage, err, d.logs())
		}
		t.Logf("%-40s %v", stage+":", f)
		return f
	}
	checkRSS := func(stage string, f procFigures) {
		t.Helper()
		if f.rssKiB > maxRSSKiB || f.threads > maxThreads {
			t.Errorf("%s: %v; want RSS under %d MiB and at most %d threads", stage, f, maxRSSKiB>>10, maxThreads)
		}
	}
	start := figures("start")

	// A client established before the trouble, with one domain cached.
	early, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	earlyR := bufio.NewReader(early)
	if got := exchange(t, early, earlyR, "postfix example.com"); got != exampleAnswer {
		t.Fatalf("first answer: got %q, want %q\n%s", got, exampleAnswer, d.logs())
	}
	warm := figures("one domain cached, one client")

	// Ten thousand connections at once, each sending one request and
	// reading nothing. The daemon serves max_connections of them; the
	// kernel queues somaxconn more and refuses the rest (EAGAIN).
	conns := make([]net.Conn, floodConns)
	var refused, failed atomic.Int64
	var firstErr error
	var errOnce sync.Once
	work := make(chan int)
	var wg sync.WaitGroup
	req := []byte(netstring("postfix example.com"))
	flood := time.Now()
	for range 200 {
		wg.Go(func() {
			for i := range work {
				c, err := net.Dial("unix", d.sock)
				if err == nil {
					c.SetWriteDeadline(time.Now().Add(10 * time.Second))
					_, err = c.Write(req)
					conns[i] = c
				}
				switch {
				case err == nil:
				case errors.Is(err, syscall.EAGAIN):
					refused.Add(1)
				default:
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
				}
			}
		})
	}
	for i := range floodConns {
		work <- i
	}
	close(work)
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	t.Logf("%d connections tried in %v: %d established, %d refused with EAGAIN (listen queue full), %d failed",
		floodConns, time.Since(flood).Round(time.Millisecond), floodConns-refused.Load()-failed.Load(), refused.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d dials failed, first: %v", failed.Load(), firstErr)
	}
	// The daemon takes max_connections; each is one more fd.
	var during procFigures
	if !fixture.Poll(20*time.Second, 10*time.Millisecond, func() bool {
		during, err = readProcFigures(pid)
		return err == nil && during.fds >= warm.fds+maxConns-1
	}) {
		t.Fatalf("the daemon never took max_connections (%d) flood connections: %v", maxConns, during)
	}
	during = figures(fmt.Sprintf("during %d connections", floodConns))
	if got := exchange(t, early, earlyR, "postfix example.com"); got != exampleAnswer {
		t.Errorf("the established client during the flood: got %q, want %q", got, exampleAnswer)
	}
	checkRSS("during the flood", during)
	// max_connections served, one more held at the limit, no more.
	if limit := warm.fds + maxConns + 1; during.fds > limit {
		t.Errorf("during the flood: %v; want at most %d fds (max_connections %d served)", during, limit, maxConns)
	}
	// The flood finishes its requests: every connection, served or
	// queued, gets its answer and is closed by the daemon in turn.
	drain := time.Now()
	for _, c := range conns {
		if c != nil {
			c.(*net.UnixConn).CloseWrite()
		}
	}
	want := []byte(netstring(exampleAnswer))
	for i, c := range conns {
		if c == nil {
			continue
		}
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("flood connection %d: got %q, %v; want %q, then the connection closed", i, got, err, want)
		}
		c.Close()
		conns[i] = nil
	}
	t.Logf("every flood connection answered and closed %v after the flood finished its requests", time.Since(drain).Round(time.Millisecond))
	var after procFigures
	if !fixture.Poll(20*time.Second, 10*time.Millisecond, func() bool {
		after, err = readProcFigures(pid)
		return err == nil && after.fds <= warm.fds
	}) {
		t.Errorf("20s after the flood hung up: %v; want %d fds, as before it", after, warm.fds)
	}
	figures("after the flood hung up")

	// A pipelined flood: all requests in one write per connection, the
	// replies read as they come, while /proc is sampled. Half-way the
	// readers pause, with the daemon holding the rest of the replies.
	var peak procFigures
	var peakMu sync.Mutex
	stopSampling := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if f, err := readProcFigures(pid); err == nil {
				peakMu.Lock()
				peak.rssKiB, peak.hwmKiB = max(peak.rssKiB, f.rssKiB), max(peak.hwmKiB, f.hwmKiB)
				peak.threads, peak.fds = max(peak.threads, f.threads), max(peak.fds, f.fds)
				peakMu.Unlock()
			}
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	})
	pipeStart := time.Now()
	batch := bytes.Repeat(req, pipeReqs)
	var answered atomic.Int64
	errs := make(chan error, 2*pipeConns)
	var pipes, halfway sync.WaitGroup
	resume := make(chan struct{})
	var pipeClients []net.Conn
	defer func() {
		for _, c := range pipeClients {
			c.Close()
		}
	}()
	for k := range pipeConns {
		c, err := net.Dial("unix", d.sock)
		if err != nil {
			t.Fatal(err)
		}
		pipeClients = append(pipeClients, c)
		c.SetDeadline(time.Now().Add(60 * time.Second))
		pipes.Go(func() {
			if _, err := c.Write(batch); err != nil {
				errs <- fmt.Errorf("pipelined connection %d: write: %w", k, err)
			}
		})
		halfway.Add(1)
		pipes.Go(func() {
			br := bufio.NewReader(c)
			got := make([]byte, len(want))
			for i := range pipeReqs {
				if i == pipeReqs/2 {
					halfway.Done()
					<-resume
				}
				if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, want) {
					errs <- fmt.Errorf("pipelined connection %d: reply %d: got %q, %v; want %q", k, i, got, err, want)
					if i < pipeReqs/2 {
						halfway.Done()
					}
					return
				}
				answered.Add(1)
			}
		})
	}
	halfway.Wait()
	paused := figures("pipelined flood, readers paused")
	checkRSS("during the pipelined flood", paused)
	if got := exchange(t, early, earlyR, "postfix example.com"); got != exampleAnswer {
		t.Errorf("the established client during the pipelined flood: got %q, want %q", got, exampleAnswer)
	}
	t.Logf("the established client was answered with %d of %d pipelined replies read", answered.Load(), pipeConns*pipeReqs)
	close(resume)
	pipes.Wait()
	close(stopSampling)
	sampler.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d pipelined requests on %d connections answered in %v", pipeConns*pipeReqs, pipeConns, time.Since(pipeStart).Round(time.Millisecond))
	peakMu.Lock()
	t.Logf("%-40s %v", "pipelined flood, highest sampled:", peak)
	checkRSS("during the pipelined flood", peak)
	peakMu.Unlock()

	// Everything closed: the fds return to what they were at the start.
	early.Close()
	for _, c := range pipeClients {
		c.Close()
	}
	if !fixture.Poll(20*time.Second, 10*time.Millisecond, func() bool {
		after, err = readProcFigures(pid)
		return err == nil && after.fds <= start.fds
	}) {
		t.Errorf("20s after every client hung up: %v; want %d fds, as at the start", after, start.fds)
	}
	after = figures("after every client hung up")
	checkRSS("after every client hung up", after)
}
