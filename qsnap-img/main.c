/*
 * main.c - qsnap-img entry point: the command table, global options
 * (--help, --version) and dispatch to the cmd_<name>.c handlers.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qsnap_img.h"

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "0.1.0"
#endif

static const struct qi_command commands[] = {
    {"bench", qi_cmd_bench,
     "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
     "[-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] "
     "[-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename"},
    {"check", qi_cmd_check,
     "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename"},
    {"commit", qi_cmd_commit,
     "commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename"},
    {"compact", qi_cmd_compact, "compact [-f fmt] [-p] [-q] filename"},
    {"compare", qi_cmd_compare,
     "compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2"},
    {"convert", qi_cmd_convert,
     "convert [-U] [-c] [-p] [-q] [-f fmt] [-O output_fmt] [-o options] "
     "[-l snapshot_param] [-S sparse_size] [-m num_threads] [-W] filename "
     "output_filename"},
    {"create", qi_cmd_create,
     "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] "
     "[-o options] filename [size]"},
    {"delete", qi_cmd_delete,
     "delete [-f fmt] [-p] [-q] [--stream | --commit] filename "
     "snapshot_or_layer\n"
     "  delete [-f fmt] [-q] --all filename"},
    {"info", qi_cmd_info, "info [-f fmt] [--output=ofmt] [-U] filename"},
    {"list", qi_cmd_list, "list [-f fmt] [--output=ofmt] [-U] filename"},
    {"map", qi_cmd_map,
     "map [-f fmt] [--start-offset=offset] [--max-length=len] "
     "[--output=ofmt] [-U] filename"},
    {"rebase", qi_cmd_rebase,
     "rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] "
     "-b backing_file [-F backing_fmt] filename"},
    {"resize", qi_cmd_resize,
     "resize [-f fmt] [-q] [--shrink] filename [+ | -]size"},
    {"snapshot", qi_cmd_snapshot,
     "snapshot [-f fmt] [-U] [-q] [--output=ofmt] [-l | -a snapshot | "
     "-c snapshot [--vmstate dir] | -d snapshot | --rename snapshot "
     "new_name] filename"},
    {"stream", qi_cmd_stream, "stream [-q] [-f fmt] [-b base] [-p] filename"},
    {"vmstate", qi_cmd_vmstate,
     "vmstate store [-f fmt] filename snapshot dir\n"
     "  vmstate list [-f fmt] [--output=ofmt] [-U] filename snapshot\n"
     "  vmstate extract [-f fmt] [-U] filename snapshot dir\n"
     "  vmstate dump [-f fmt] [-U] filename snapshot output_file"},
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static void print_version(void)
{
    printf("%s version %s (libqsnap %s)\n", QI_PROG, PACKAGE_VERSION,
           qsnap_version());
}

void qi_help(void)
{
    print_version();
    printf("usage: %s [standard options] command [command options]\n"
           "qcow2 disk image utility\n"
           "\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n"
           "\n"
           "Command syntax:\n",
           QI_PROG);
    for (size_t i = 0; i < N_COMMANDS; i++) {
        printf("  %s\n", commands[i].synopsis);
    }
    printf("\n"
           "Command parameters:\n"
           "  'filename' is a disk image filename\n"
           "  'fmt' is the disk image format (qcow2 or raw). It is guessed "
           "automatically\n"
           "    when not given\n"
           "  'cache' is the cache mode used to open the image (bench, "
           "commit, rebase):\n"
           "    'none', 'writeback' (default), 'writethrough', 'directsync' "
           "or 'unsafe'\n"
           "  'src_cache' (rebase) takes the same values; it is checked and "
           "ignored\n"
           "  'size' is the disk image size in bytes. Optional suffixes\n"
           "    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' "
           "(gigabyte, 1024M),\n"
           "    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' "
           "(exabyte, 1024P)  are\n"
           "    supported. 'b' is ignored.\n"
           "  'output_filename' is the destination disk image filename\n"
           "  'output_fmt' is the destination format\n"
           "  'snapshot_param' is param used for internal snapshot, format\n"
           "    is 'snapshot.id=[ID],snapshot.name=[NAME]', or\n"
           "    '[ID_OR_NAME]'\n"
           "  'options' is a comma separated list of format specific options "
           "in a\n"
           "    name=value format. Use -o help for an overview of the options "
           "supported by\n"
           "    the used format\n"
           "  '-c' indicates that target image must be compressed (qcow2 "
           "format only)\n"
           "  '-u' allows creating an image whose backing file cannot be "
           "opened\n"
           "  '-h' with or without a command shows this help\n"
           "  '-p' show progress of command (only certain commands)\n"
           "  '-q' use Quiet mode - do not print any output (except errors)\n"
           "  '-S' indicates the consecutive number of bytes (defaults to 4k) "
           "that must\n"
           "       contain only zeros for %s to create a sparse image during\n"
           "       conversion. If the number of bytes is 0, the source will "
           "not be scanned for\n"
           "       unallocated or zero sectors, and the destination image will "
           "always be\n"
           "       fully allocated\n"
           "  '--output' takes the format in which the output must be done "
           "(human or json)\n"
           "  '-U' opens images read-only without taking a write lock, so a "
           "running VM\n"
           "       may keep the image open\n"
           "\n"
           "Parameters to check subcommand:\n"
           "  '-r' tries to repair any inconsistencies that are found during "
           "the check.\n"
           "       '-r leaks' repairs only cluster leaks, whereas '-r all' "
           "fixes all\n"
           "       kinds of errors, with a higher risk of choosing the wrong "
           "fix or\n"
           "       hiding corruption that has already occurred.\n"
           "\n"
           "Parameters to convert subcommand:\n"
           "  '-m' specifies how many threads work in parallel during the "
           "convert\n"
           "       process (defaults to 2)\n"
           "  '-W' allow to write to the target out of order rather than "
           "sequential\n"
           "\n"
           "Parameters to snapshot subcommand:\n"
           "  'snapshot' is the name of the snapshot to create, apply or "
           "delete\n"
           "  '-a' applies a snapshot (revert disk to saved state)\n"
           "  '-c' creates a snapshot\n"
           "  '-d' deletes a snapshot\n"
           "  '-l' lists all snapshots in the given image\n"
           "  '--rename' renames a snapshot (given by ID or name)\n"
           "  '--vmstate' with '-c' stores the regular files of 'dir' as the "
           "snapshot's\n"
           "       VM state sections\n"
           "\n"
           "Parameters to commit subcommand:\n"
           "  'base' is the file of the backing chain to commit into "
           "(default: the\n"
           "    backing file); it implies '-d'\n"
           "  '-d' keeps the committed image's data; otherwise it is emptied "
           "and reads\n"
           "       through its backing file\n"
           "\n"
           "Parameters to rebase subcommand:\n"
           "  '-u' only rewrites the backing file name; the old and the new "
           "backing files\n"
           "       must show the same data. An empty 'backing_file' removes "
           "the backing file\n"
           "\n"
           "Parameters to stream subcommand:\n"
           "  'base' is the lowest layer to keep (default: none); what the "
           "layers above it\n"
           "    hold is copied into the image\n"
           "\n"
           "Parameters to delete subcommand:\n"
           "  'snapshot_or_layer' is an internal snapshot (ID or name) of "
           "'filename', or a\n"
           "    file of its backing chain, which is merged away so that no "
           "remaining layer\n"
           "    changes\n"
           "  '--stream' copies the layer's data up into the layer above it\n"
           "  '--commit' copies the layer above down into it and moves it to "
           "that layer's\n"
           "       path (default: whichever moves less data)\n"
           "\n"
           "Parameters to compare subcommand:\n"
           "  '-f' first image format\n"
           "  '-F' second image format\n"
           "  '-s' run in Strict mode - fail on different image size or "
           "sector allocation\n"
           "\n"
           "Supported formats: qcow2 raw\n",
           QI_PROG);
    exit(EXIT_SUCCESS);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        return qi_usage_error("Not enough arguments");
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        qi_help();
    }
    if (strcmp(cmd, "-V") == 0 || strcmp(cmd, "--version") == 0) {
        print_version();
        return 0;
    }
    if (cmd[0] == '-') {
        return qi_usage_error("unrecognized option '%s'", cmd);
    }
    for (size_t i = 0; i < N_COMMANDS; i++) {
        if (strcmp(cmd, commands[i].name) == 0) {
            /* The command sees its name as argv[0]. */
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    return qi_usage_error("Command not found: %s", cmd);
}
